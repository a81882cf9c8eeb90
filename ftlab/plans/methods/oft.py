"""OFT: orthogonal fine-tuning (Qiu et al., NeurIPS 2023), peft's OFT (v2) layout.

`oft(block_size=32, train_head=True)` rotates every selected kernel by a learned block-diagonal
orthogonal matrix; the kernel stays frozen bit for bit. Read the kernel as the D x Cout matrix
of its output channels' filters (D = Cin k k for a conv, rows in torch's (Cin, kh, kw) order as
peft flattens a `Conv2d` weight; D = in for a dense kernel). OFT multiplies every filter by the
same orthogonal R (D x D), so the angles between the filters, the "hyperspherical energy" the
paper preserves, do not change:

  W' = R W,   R = diag(R_1, ..., R_n),   R_i = (I + Q_i)^-1 (I - Q_i)  (the Cayley transform)

with n = D / b blocks of size b and Q_i skew-symmetric (Q_i^T = -Q_i), so each R_i is
orthogonal. Q_i is stored as its b (b - 1) / 2 entries above the diagonal, in
`torch.triu_indices` order, as peft stores them:

  conv   kernel [k, k, Cin, Cout]   oft_q [n, b (b - 1) / 2]     (n b = Cin k k)
  dense  kernel [in, out]           oft_q [n, b (b - 1) / 2]     (n b = in)

Q starts at zero, so R = I and step 0 is the loaded model bit for bit (the rotation is a matmul
at HIGHEST precision, in which multiplying by I is exact). Where b does not divide D it is
moved to the nearest divisor (ties to the smaller), as peft's `adjust_oft_parameters` does
(VGG's first conv has D = 27); the block size of each layer is its adapter's shape. The
Cayley transform is exact (a linear solve, by elimination in XLA's own operations: `solve`),
peft's `use_cayley_neumann=False`; peft's default approximates it by a Neumann series, which
is not exactly orthogonal. peft's COFT projection, block sharing and BOFT's butterfly factors
are not implemented. Counts per layer: (D / b) b (b - 1) / 2.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ftlab.plans import registry, tuners
from ftlab.plans.registry import Call, Param, PlanError

Q = 'oft_q'
DEFAULT_BLOCK_SIZE = 32  # peft's `oft_block_size` default


def block_size_of(call: Call) -> int:
  """The checked `block_size` of an `oft(...)` call.

  Raises:
    PlanError: a block size that is not an integer >= 2.
  """
  size = call.get('block_size', DEFAULT_BLOCK_SIZE)
  if isinstance(size, bool) or not isinstance(size, int) or size < 2:
    raise PlanError(f'policy oft: block_size={size!r} is not an integer >= 2 (e.g. oft(16))')
  return size


def fitted_block_size(dim: int, size: int) -> int:
  """The divisor of `dim` nearest to `size` (the smaller on a tie; `dim` if `size` >= `dim`),
  the block size peft's `adjust_oft_parameters` picks for a layer whose input dimension `size`
  does not divide."""
  if size >= dim:
    return dim
  lower = max(d for d in range(1, size + 1) if dim % d == 0)
  upper = min(d for d in range(size, dim + 1) if dim % d == 0)
  return lower if size - lower <= upper - size else upper


def block_size_from(entries: int) -> int:
  """b from the b (b - 1) / 2 stored entries of one block's Q."""
  return int(round((1 + np.sqrt(1 + 8 * entries)) / 2))


def _eliminate(a: jax.Array, b: jax.Array) -> jax.Array:
  """`a^-1 b` for `[n, m, m]` batches by Gauss-Jordan elimination without pivoting, in XLA's
  own operations (no LAPACK call: see `solve`). Without pivoting it needs every leading minor
  of `a` nonzero, which holds for I + Q with Q skew-symmetric (each leading block is again
  I + skew, whose eigenvalues 1 + i t have modulus >= 1); for a = I it returns b exactly."""
  m = a.shape[-1]
  index = jnp.arange(m)

  def step(k, ab):
    a, b = ab
    pivot = a[:, k, k][:, None]
    row_a, row_b = a[:, k, :] / pivot, b[:, k, :] / pivot
    # Column k of every other row, removed by subtracting that multiple of the pivot row.
    factor = jnp.where(index == k, 0.0, a[:, :, k])[:, :, None]
    is_k = (index == k)[None, :, None]
    a = jnp.where(is_k, row_a[:, None, :], a - factor * row_a[:, None, :])
    b = jnp.where(is_k, row_b[:, None, :], b - factor * row_b[:, None, :])
    return a, b

  return jax.lax.fori_loop(0, m, step, (a, b))[1]


@jax.custom_vjp
def solve(a: jax.Array, b: jax.Array) -> jax.Array:
  """`a^-1 b` for `[n, m, m]` float32 batches of matrices I + Q (Q skew-symmetric).

  `jnp.linalg.solve` would call LAPACK, whose batched CPU kernels in jaxlib 0.10 wait on the
  thread pool they run in: with a few such solves in one step (one per adapted layer) on a
  2-core machine every worker waited and the first training step of `oft(64) & blocks([4,
  5])` on VGG16 never finished (stacks in jaxlib's `ParallelBatchMap` of `lapack_strsm_ffi`).
  The gradient is the implicit one (d b = a^-T g, d a = -(d b) x^T), by the same elimination.
  """
  return _eliminate(a, b)


def _solve_fwd(a, b):
  x = _eliminate(a, b)
  return x, (a, x)


def _solve_bwd(residuals, g):
  a, x = residuals
  grad_b = _eliminate(jnp.swapaxes(a, -1, -2), g)
  return -grad_b @ jnp.swapaxes(x, -1, -2), grad_b


solve.defvjp(_solve_fwd, _solve_bwd)


def rotations(q: jax.Array) -> jax.Array:
  """`[n, b, b]` orthogonal blocks `(I + Q)^-1 (I - Q)` from `[n, b (b - 1) / 2]` upper
  triangles (float32; Q skew-symmetric). Q = 0 gives the identity exactly."""
  n, entries = q.shape
  b = block_size_from(entries)
  rows, cols = np.triu_indices(b, 1)
  upper = jnp.zeros((n, b, b), jnp.float32).at[:, rows, cols].set(q.astype(jnp.float32))
  skew = upper - upper.transpose(0, 2, 1)
  eye = jnp.broadcast_to(jnp.eye(b, dtype=jnp.float32), skew.shape)
  # I + Q and I - Q commute, so the order of the inverse and the product does not matter.
  return solve(eye + skew, eye - skew)


@registry.register
class OFT(tuners.Tuner):
  name = 'oft'
  params = (Param('block_size', DEFAULT_BLOCK_SIZE), Param('train_head', True))
  summary = (
    'orthogonal fine-tuning: a block-diagonal rotation (Cayley transform of skew-symmetric '
    "blocks of size block_size) of every frozen kernel's filters, peft's OFT layout + head"
  )
  paper = 'Qiu et al., NeurIPS 2023'
  title = 'OFT'
  leaves = (Q,)

  def check(self, call: Call) -> None:
    block_size_of(call)

  def adapters(self, call: Call, kernel: Any, key: jax.Array) -> dict[str, Any]:
    """Q `[D / b, b (b - 1) / 2]` zeros, float32 (`key` unused: OFT starts at the identity)."""
    dim = int(np.prod(kernel.shape[:-1]))
    b = fitted_block_size(dim, block_size_of(call))
    shape = (dim // b, b * (b - 1) // 2)
    return {Q: jnp.zeros(shape, jnp.float32)}

  def fold(self, layer: Mapping[str, Any]) -> dict[str, Any]:
    """The kernel `R W`, R block-diagonal over the rows of `tuners.torch_order(kernel)`."""
    plain = {k: v for k, v in layer.items() if k not in self.leaves}
    kernel = layer['kernel']
    blocks = rotations(layer[Q])
    n, b, _ = blocks.shape
    matrix = tuners.torch_order(kernel).astype(jnp.float32).reshape(n, b, kernel.shape[-1])
    rotated = jnp.einsum('nij,njo->nio', blocks, matrix, precision=jax.lax.Precision.HIGHEST)
    plain['kernel'] = tuners.from_torch_order(
      rotated.reshape(n * b, kernel.shape[-1]), kernel.shape
    ).astype(kernel.dtype)
    return plain
