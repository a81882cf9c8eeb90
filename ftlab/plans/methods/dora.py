"""DoRA: weight-decomposed low-rank adaptation (Liu et al., ICML 2024).

`dora(rank, alpha=8, train_head=True)` trains, for each selected conv or dense kernel, LoRA's
two factors and a magnitude per output channel; the kernel stays frozen bit for bit:

  conv   kernel [k, k, Cin, Cout]   dora_a [k, k, Cin, r]   dora_b [r, Cout]   dora_dm [Cout]
  dense  kernel [in, out]           dora_a [in, r]          dora_b [r, out]    dora_dm [out]
         dora_alpha []  (a constant: the update is scaled by alpha / r; never trained)

The kernel is split into a direction and a magnitude per output channel:

  V = W + alpha / r * A B,     W' = m . V / ||V||,     m = ||W|| + dm

with ||V|| the Euclidean norm of each output channel's filter (over k, k, Cin for a conv,
over `in` for a dense kernel: peft's `DoraConv2dLayer` and `DoraLinearLayer` norm over all
axes but the output one). A B is LoRA's update, laid out as `ftlab.plans.methods.lora` says
(for a conv, a k x k convolution down to r channels and a 1 x 1 one up, i.e. a rank-r update
of the kernel read as a (k k Cin) x Cout matrix). As in the paper (section 4.3) and peft,
||V|| is treated as a constant in the backward pass (`stop_gradient`): the forward value is
the same, the gradient is the paper's, and the norm's backward is not stored.

Initialisation: A as LoRA's (U(+-1/sqrt(fan_in))), B zeros, m = ||W|| as in peft. The
magnitude is stored as its change dm from the loaded kernel's norms (zero at step 0), and
`fold` computes ||W|| and ||V|| in one reduction over both: at step 0 V is W bit for bit, the
two norms are the same float, m / ||V|| is exactly one and the logits are the loaded model's
(a magnitude stored whole, computed once at init and divided by a norm computed inside the
step, was off by an ulp on some channels). The gradient of dm is the gradient of m; the one
difference from peft's parameter is that weight decay pulls m towards the loaded norms rather
than towards zero. Counts per adapted layer: r (k k Cin + Cout) + Cout for a conv,
r (in + out) + out for a dense kernel.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ftlab.plans import registry, tuners
from ftlab.plans.registry import Call, Param

A, B, DM, ALPHA = 'dora_a', 'dora_b', 'dora_dm', 'dora_alpha'
DEFAULT_ALPHA = 8.0  # peft's `lora_alpha` default


def channel_norms(kernels: Any) -> jax.Array:
  """`[n, Cout]` float32: the Euclidean norm of each output channel's filter of `n` kernels
  stacked on a leading axis (conv `[n, k, k, Cin, Cout]`, dense `[n, in, out]`), summed over
  every axis but the first and the last, at float32 whatever the kernels' dtype. One reduction
  for all `n`: equal kernels get bit-equal norms."""
  squared = jnp.square(kernels.astype(jnp.float32))
  return jnp.sqrt(jnp.sum(squared, axis=tuple(range(1, kernels.ndim - 1))))


@registry.register
class DoRA(tuners.Tuner):
  name = 'dora'
  params = (Param('rank'), Param('alpha', DEFAULT_ALPHA), Param('train_head', True))
  summary = (
    'weight-decomposed LoRA: m . (W + alpha/r A B) / ||W + alpha/r A B|| per output channel of '
    'every frozen conv and dense kernel outside the head + head'
  )
  paper = 'Liu et al., ICML 2024'
  title = 'DoRA'
  leaves = (A, B, DM, ALPHA)
  constants = {ALPHA: "DoRA's constant scale"}

  def check(self, call: Call) -> None:
    tuners.rank_and_alpha(call, DEFAULT_ALPHA)

  def adapters(self, call: Call, kernel: Any, key: jax.Array) -> dict[str, Any]:
    """A `[..., r]` (U(+-1/sqrt(fan_in)), fan_in = k k Cin or in), B `[r, Cout]` zeros, dm
    `[Cout]` float32 zeros (m = ||W||), alpha a float32 scalar."""
    rank, alpha = tuners.rank_and_alpha(call, DEFAULT_ALPHA)
    shape_a, shape_b = (*kernel.shape[:-1], rank), (rank, kernel.shape[-1])
    return {
      A: tuners.kaiming_uniform(key, shape_a, int(np.prod(kernel.shape[:-1])), kernel.dtype),
      B: jnp.zeros(shape_b, kernel.dtype),
      DM: jnp.zeros(shape_b[1:], jnp.float32),
      ALPHA: jnp.asarray(alpha, jnp.float32),
    }

  def fold(self, layer: Mapping[str, Any]) -> dict[str, Any]:
    """The kernel `m . V / ||V||` with `V = W + alpha / r * A B` and `m = ||W|| + dm`, the norms
    per output channel and held constant for gradients (`stop_gradient`)."""
    plain = {k: v for k, v in layer.items() if k not in self.leaves}
    a, b, kernel = layer[A], layer[B], layer['kernel']
    delta = jnp.tensordot(a, b, axes=1) * (layer[ALPHA] / a.shape[-1])
    direction = kernel + delta.astype(kernel.dtype)
    # One reduction over [W, V]: equal inputs give equal norms, so m / ||V|| is one at step 0.
    loaded, current = jax.lax.stop_gradient(channel_norms(jnp.stack([kernel, direction])))
    scale = (loaded + layer[DM]) / current
    plain['kernel'] = (direction * scale).astype(kernel.dtype)
    return plain
