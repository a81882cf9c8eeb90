"""LoKr: a Kronecker-product update of frozen conv and dense kernels (LyCORIS's LoKr, Yeh et
al., ICLR 2024, "Navigating Text-To-Image Customization"; peft's `LoKrConfig`).

`lokr(rank, alpha=8, factor=-1, train_head=True)` factors each selected kernel's channel
counts, Cout = a b and Cin (or a dense kernel's `in`) = c d (`factorization`: the two factors
nearest the square root, or `factor` and the rest), and trains a small full matrix W1 and a
rank-r matrix W2; the kernel stays frozen bit for bit:

  W' = W + alpha / r * kron(W1, W2)

  conv   kernel [k, k, Cin, Cout]   lokr_w1 [c, a]   lokr_u [k, k, d, r]   lokr_v [r, b]
  dense  kernel [in, out]           lokr_w1 [c, a]   lokr_u [d, r]         lokr_v [r, b]
         lokr_alpha []  (a constant; never trained)

with W2 = U V the [k, k, d, b] (conv) or [d, b] (dense) block that each entry of W1 scales:
the update of input channel i1 d + i2 and output channel o1 b + o2 is
W1[i1, o1] W2[..., i2, o2], torch's `kron` of peft's [a, c] and [b, d, k, k] factors. A 3 x 3
conv kernel is factorised as peft does by default (no `use_effective_conv2d`, no
`decompose_both`): W1 has no spatial extent, W2 keeps the k x k window, and W2's rank is over
its (k k d) x b reading. Unlike peft, W2 is always the low-rank product U V: peft switches to a
full W2 where r >= max(b, d) / 2, which would give layers different adapter leaves.
Initialisation is peft's: W1 zeros (so step 0 is the loaded model bit for bit), U
U(+-1/sqrt(k k d)), V U(+-1/sqrt(r)). Counts per adapted layer: c a + r (k k d + b).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from ftlab.plans import registry, tuners
from ftlab.plans.registry import Call, Param, PlanError

W1, U, V, ALPHA = 'lokr_w1', 'lokr_u', 'lokr_v', 'lokr_alpha'
DEFAULT_ALPHA = 8.0  # peft's LoKrConfig `alpha` default


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
  """`(m, n)` with m n = dim: `(factor, dim // factor)` when `factor` > 0 divides `dim`, else m
  the largest divisor of `dim` at most sqrt(dim) and at most `factor` (when > 0), the split
  LyCORIS's and peft's `factorization` find by their search (256 -> (16, 16),
  128 -> (8, 16), 127 -> (1, 127), 128 with factor 4 -> (4, 32))."""
  if factor > 0 and dim % factor == 0:
    return factor, dim // factor
  limit = math.isqrt(dim) if factor <= 0 else min(factor, math.isqrt(dim))
  m = max(d for d in range(1, limit + 1) if dim % d == 0)
  return m, dim // m


def spec_of(call: Call) -> tuple[int, float, int]:
  """`(rank, alpha, factor)` of a `lokr(...)` call, checked.

  Raises:
    PlanError: a bad rank or alpha (`tuners.rank_and_alpha`), or a factor that is not -1 or a
      positive integer.
  """
  rank, alpha = tuners.rank_and_alpha(call, DEFAULT_ALPHA)
  factor = call.get('factor', -1)
  if isinstance(factor, bool) or not isinstance(factor, int) or not (factor == -1 or factor > 0):
    raise PlanError(
      f'policy lokr: factor={factor!r} is not -1 (near the square root) or a positive integer'
    )
  return rank, alpha, factor


@registry.register
class LoKr(tuners.Tuner):
  name = 'lokr'
  params = (
    Param('rank'),
    Param('alpha', DEFAULT_ALPHA),
    Param('factor', -1),
    Param('train_head', True),
  )
  summary = (
    'Kronecker update alpha/r * kron(W1, U V) of every frozen conv and dense kernel outside '
    'the head, channels split near their square roots (LyCORIS/peft LoKr) + head'
  )
  paper = 'Yeh et al., ICLR 2024 (LyCORIS)'
  title = 'LoKr'
  leaves = (W1, U, V, ALPHA)
  constants = {ALPHA: "LoKr's constant scale"}

  def check(self, call: Call) -> None:
    spec_of(call)

  def adapters(self, call: Call, kernel: Any, key: jax.Array) -> dict[str, Any]:
    """W1 `[c, a]` zeros, U `[..., d, r]` U(+-1/sqrt(k k d)), V `[r, b]` U(+-1/sqrt(r)), alpha a
    float32 scalar; factors in the kernel's dtype."""
    rank, alpha, factor = spec_of(call)
    c, d = factorization(kernel.shape[-2], factor)
    a, b = factorization(kernel.shape[-1], factor)
    window = kernel.shape[:-2]  # (k, k) for a conv, () for a dense kernel
    shape_w1, shape_u, shape_v = (c, a), (*window, d, rank), (rank, b)
    key_u, key_v = jax.random.split(key)
    return {
      # W1 at zero makes the Kronecker product zero: step 0 is the loaded model.
      W1: jnp.zeros(shape_w1, kernel.dtype),
      U: tuners.kaiming_uniform(key_u, shape_u, math.prod(shape_u[:-1]), kernel.dtype),
      V: tuners.kaiming_uniform(key_v, shape_v, rank, kernel.dtype),
      ALPHA: jnp.asarray(alpha, jnp.float32),
    }

  def fold(self, layer: Mapping[str, Any]) -> dict[str, Any]:
    """The kernel `W + alpha / r * kron(W1, U V)` over the (input, output) channel axes."""
    plain = {k: v for k, v in layer.items() if k not in self.leaves}
    kernel, w1, u, v = layer['kernel'], layer[W1], layer[U], layer[V]
    w2 = jnp.tensordot(u, v, axes=1)  # [..., d, b]
    (c, a), (d, b) = w1.shape, w2.shape[-2:]
    # Input channel i1 d + i2 and output channel o1 b + o2: W1's index is the outer one.
    kron = jnp.einsum('ca,...db->...cdab', w1, w2).reshape(*w2.shape[:-2], c * d, a * b)
    delta = kron * (layer[ALPHA] / u.shape[-1])
    plain['kernel'] = (kernel + delta.astype(kernel.dtype)).astype(kernel.dtype)
    return plain
