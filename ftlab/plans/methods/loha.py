"""LoHa: a low-rank Hadamard-product update of frozen conv and dense kernels (Hyeon-Woo et
al., ICLR 2022, FedPara; LyCORIS's LoHa, peft's `LoHaConfig`).

`loha(rank, alpha=8, train_head=True)` trains, for each selected kernel W read as the matrix
of its output channels' filters (D x Cout, D = k k Cin for a conv, `in` for a dense kernel),
two rank-r pairs whose products are multiplied entry by entry; W stays frozen bit for bit:

  W' = W + alpha / r * (A1 B1) . (A2 B2)

  conv   kernel [k, k, Cin, Cout]   loha_a1, loha_a2 [k, k, Cin, r]   loha_b1, loha_b2 [r, Cout]
  dense  kernel [in, out]           loha_a1, loha_a2 [in, r]          loha_b1, loha_b2 [r, out]
         loha_alpha []  (a constant; never trained)

The Hadamard product of two rank-r matrices has rank up to r^2 from 2 r (D + Cout)
parameters, twice LoRA's count at the same r. A 3 x 3 conv kernel is factorised as peft does
without `use_effective_conv2d` (its default): each A B is a rank-r matrix over the kernel's
(k k Cin) x Cout reading, A holding the k x k x Cin side (as LoRA's A), so the update is
entry-wise and the order the k, k, Cin axes are flattened in does not matter.
Initialisation is peft's, whose `hada_w1_a` [Cout, r] is B1 transposed and `hada_w1_b`
[r, D] is A1 transposed (and likewise for the second pair): B1 and B2 U(+-1/sqrt(r)), A1
U(+-1/sqrt(D)), A2 zeros, so the update is zero and step 0 is the loaded model bit for bit.
Counts per adapted layer: 2 r (k k Cin + Cout) for a conv, 2 r (in + out) for a dense kernel.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ftlab.plans import registry, tuners
from ftlab.plans.registry import Call, Param

A1, B1, A2, B2, ALPHA = 'loha_a1', 'loha_b1', 'loha_a2', 'loha_b2', 'loha_alpha'
DEFAULT_ALPHA = 8.0  # peft's LoHaConfig `alpha` default


@registry.register
class LoHa(tuners.Tuner):
  name = 'loha'
  params = (Param('rank'), Param('alpha', DEFAULT_ALPHA), Param('train_head', True))
  summary = (
    'low-rank Hadamard update alpha/r * (A1 B1) . (A2 B2) of every frozen conv and dense '
    'kernel outside the head (LyCORIS/peft LoHa) + head'
  )
  paper = 'Hyeon-Woo et al., ICLR 2022 (FedPara); LyCORIS'
  title = 'LoHa'
  leaves = (A1, B1, A2, B2, ALPHA)
  constants = {ALPHA: "LoHa's constant scale"}

  def check(self, call: Call) -> None:
    tuners.rank_and_alpha(call, DEFAULT_ALPHA)

  def adapters(self, call: Call, kernel: Any, key: jax.Array) -> dict[str, Any]:
    """A1 `[..., r]` U(+-1/sqrt(D)), B1 and B2 `[r, Cout]` U(+-1/sqrt(r)), A2 zeros (peft's
    initialisation), alpha a float32 scalar; factors in the kernel's dtype."""
    rank, alpha = tuners.rank_and_alpha(call, DEFAULT_ALPHA)
    shape_a, shape_b = (*kernel.shape[:-1], rank), (rank, kernel.shape[-1])
    key_a1, key_b1, key_b2 = jax.random.split(key, 3)
    dim = int(np.prod(kernel.shape[:-1]))
    return {
      A1: tuners.kaiming_uniform(key_a1, shape_a, dim, kernel.dtype),
      B1: tuners.kaiming_uniform(key_b1, shape_b, rank, kernel.dtype),
      # A2 at zero makes (A1 B1) . (A2 B2) zero: the folded kernel is the loaded one at step 0.
      A2: jnp.zeros(shape_a, kernel.dtype),
      B2: tuners.kaiming_uniform(key_b2, shape_b, rank, kernel.dtype),
      ALPHA: jnp.asarray(alpha, jnp.float32),
    }

  def fold(self, layer: Mapping[str, Any]) -> dict[str, Any]:
    """The kernel `W + alpha / r * (A1 B1) . (A2 B2)` (products over the rank axis)."""
    plain = {k: v for k, v in layer.items() if k not in self.leaves}
    kernel, a1 = layer['kernel'], layer[A1]
    first = jnp.tensordot(a1, layer[B1], axes=1)
    second = jnp.tensordot(layer[A2], layer[B2], axes=1)
    delta = first * second * (layer[ALPHA] / a1.shape[-1])
    plain['kernel'] = (kernel + delta.astype(kernel.dtype)).astype(kernel.dtype)
    return plain
