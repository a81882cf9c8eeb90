"""LoRA: low-rank updates of frozen conv and dense kernels (Hu et al., ICLR 2022).

`lora(rank, alpha=8, train_head=True)` in a plan expression trains, for each selected layer,
two adapter leaves next to its kernel while the kernel itself stays frozen bit for bit:

  conv   kernel [k, k, Cin, Cout]   lora_a [k, k, Cin, r]   lora_b [r, Cout]
  dense  kernel [in, out]           lora_a [in, r]          lora_b [r, out]
         lora_alpha []  (a constant: the scale is alpha / r; never trained)

A conv adapter is peft's `Conv2d` LoRA layer: a k x k convolution down to r channels (same
stride and padding as the kernel) followed by a 1 x 1 convolution up to Cout. Convolution is
linear, so the pair equals one convolution with the kernel `einsum('hwir,ro->hwio', A, B)`:
a rank-r update of the kernel read as the (k*k*Cin) x Cout matrix the convolution multiplies
image patches by, which is what "rank" means for a dense kernel too. `fold` adds
`alpha / r * A B` to each kernel and drops the adapters, so the model stays a plain VGG. B
starts at zero, so the first step's logits are the loaded model's, bit for bit; A starts as
peft's (Kaiming-uniform, a = sqrt(5): U(+-1/sqrt(fan_in))).

Which layers get adapters is the plan's choice: `lora(r)` adapts every kernel outside the head
(the new head trains whole unless `train_head=False`); `lora(r) & blocks([4, 5])` those of
blocks 4-5; `lora(r) | bitfit` adds the biases; `lp_ft(N) + lora(r)` probes, then trains the
adapters (`ftlab.plans.tuners` holds what every tuner shares).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ftlab.plans import registry, tuners
from ftlab.plans.registry import Call, Param

A, B, ALPHA = 'lora_a', 'lora_b', 'lora_alpha'
DEFAULT_ALPHA = 8.0  # peft's `lora_alpha` default


@dataclasses.dataclass(frozen=True)
class Spec:
  """A plan's LoRA term: rank r and alpha (the update is scaled by alpha / r)."""

  rank: int
  alpha: float


def spec_of(call: Call) -> Spec:
  """The checked arguments of a `lora(...)` call.

  Raises:
    PlanError: a rank that is not a positive integer or an alpha that is not a positive number.
  """
  return Spec(*tuners.rank_and_alpha(call, DEFAULT_ALPHA))


@registry.register
class LoRA(tuners.Tuner):
  name = 'lora'
  params = (Param('rank'), Param('alpha', DEFAULT_ALPHA), Param('train_head', True))
  summary = (
    'low-rank update alpha/r * A B of every frozen conv and dense kernel outside the head '
    "(peft's Conv2d layout: k x k down to r channels, 1 x 1 up) + head"
  )
  paper = 'Hu et al., ICLR 2022'
  title = 'LoRA'
  leaves = (A, B, ALPHA)
  constants = {ALPHA: "LoRA's constant scale"}

  def check(self, call: Call) -> None:
    spec_of(call)

  def adapters(self, call: Call, kernel: Any, key: jax.Array) -> dict[str, Any]:
    """A `[..., r]` (U(+-1/sqrt(fan_in)), fan_in = k * k * Cin or in, as peft's
    `kaiming_uniform_(a=sqrt(5))`), B `[r, Cout]` zeros, alpha a float32 scalar; A and B in
    the kernel's dtype."""
    spec = spec_of(call)
    shape_a, shape_b = (*kernel.shape[:-1], spec.rank), (spec.rank, kernel.shape[-1])
    # fan_in excludes the output axis: k*k*Cin for a conv, `in` for a dense kernel.
    fan_in = int(np.prod(kernel.shape[:-1]))
    return {
      A: tuners.kaiming_uniform(key, shape_a, fan_in, kernel.dtype),
      # B at zero makes A B zero, so the folded kernel is the loaded kernel bit for bit at step 0.
      B: jnp.zeros(shape_b, kernel.dtype),
      # Stored as a leaf, not only in the plan: a checkpoint or exported tree folds itself
      # without the plan expression that made it.
      ALPHA: jnp.asarray(spec.alpha, jnp.float32),
    }

  def fold(self, layer: Mapping[str, Any]) -> dict[str, Any]:
    """The kernel `W + alpha / r * A B` (A B over the rank axis: `einsum('...r,ro->...o')`)."""
    plain = {k: v for k, v in layer.items() if k not in self.leaves}
    a, b, alpha, kernel = layer[A], layer[B], layer[ALPHA], layer['kernel']
    # `a.shape[-1]` is r, static: the scale alpha / r keeps the update's size comparable across
    # ranks, as in the paper.
    delta = jnp.tensordot(a, b, axes=1) * (alpha / a.shape[-1])
    plain['kernel'] = (kernel + delta.astype(kernel.dtype)).astype(kernel.dtype)
    return plain

  def describe(self, layers: Mapping[str, Mapping[str, Any]]) -> str:
    """The adapted layers, rank, alpha and adapter count."""
    first = next(iter(layers.values()))
    rank, alpha = np.shape(first[A])[-1], first.get(ALPHA)
    shown = (
      ''
      if alpha is None or isinstance(alpha, jax.ShapeDtypeStruct)
      else f', alpha {float(alpha):g}'
    )
    count = sum(int(np.prod(np.shape(v[A])) + np.prod(np.shape(v[B]))) for v in layers.values())
    return (
      f'LoRA (rank {rank}{shown}): {count:,} adapter parameters on {len(layers)} frozen kernels, '
      'folded into them for export, soups and evaluation (tuners.merge)'
    )
