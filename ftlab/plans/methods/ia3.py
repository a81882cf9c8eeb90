"""(IA)^3: a learned rescaling of each selected layer's output channels (Liu et al.,
NeurIPS 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning").

`ia3(train_head=True)` puts one vector beside every selected conv or dense kernel; the kernel
and bias stay frozen bit for bit:

  conv   kernel [k, k, Cin, Cout]   ia3_scale [Cout]
  dense  kernel [in, out]           ia3_scale [out]

The layer's output is multiplied by l per output channel, y' = l . (W * x + b), peft's
`IA3Config` on a `Conv2d` or `Linear` that is not a feed-forward layer (peft scales the bias
with it when merging). Folded: W' = W . l, b' = b . l. l starts at one, so step 0 is the loaded
model bit for bit. Counts: Cout per adapted layer. The paper rescales a transformer's keys,
values and feed-forward activations; on a CNN the corresponding choice is each conv's output
channels, as peft does for `Conv2d`.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from ftlab.plans import registry, tuners
from ftlab.plans.registry import Call, Param

SCALE = 'ia3_scale'


@registry.register
class IA3(tuners.Tuner):
  name = 'ia3'
  params = (Param('train_head', True),)
  summary = (
    'a learned scale of each output channel of every frozen conv and dense kernel outside the '
    "head (peft's IA3 on Conv2d), folded into the kernel and bias + head"
  )
  paper = 'Liu et al., NeurIPS 2022'
  title = '(IA)^3'
  leaves = (SCALE,)

  def adapters(self, call: Call, kernel: Any, key: jax.Array) -> dict[str, Any]:
    """The scale `[Cout]`, ones in the kernel's dtype (`key` unused)."""
    shape = (kernel.shape[-1],)
    return {SCALE: jnp.ones(shape, kernel.dtype)}

  def fold(self, layer: Mapping[str, Any]) -> dict[str, Any]:
    """`kernel * l` and `bias * l` (l broadcast over the output axis)."""
    plain = {k: v for k, v in layer.items() if k not in self.leaves}
    scale = layer[SCALE]
    plain['kernel'] = (layer['kernel'] * scale).astype(layer['kernel'].dtype)
    if 'bias' in layer:
      plain['bias'] = (layer['bias'] * scale).astype(layer['bias'].dtype)
    return plain
