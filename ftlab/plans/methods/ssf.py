"""SSF: a learned scale and shift of each selected layer's output channels (Lian et al.,
NeurIPS 2022, "Scaling & Shifting Your Features").

`ssf(train_head=True)` puts two vectors beside every selected conv or dense kernel; the kernel
and bias stay frozen bit for bit:

  conv   kernel [k, k, Cin, Cout]   ssf_scale [Cout]   ssf_shift [Cout]
  dense  kernel [in, out]           ssf_scale [out]    ssf_shift [out]

The layer's output y = W * x + b becomes s . y + t per output channel (the paper's SSF-ADA
after each operation, here after each selected convolution or dense layer, before its
BatchNorm and ReLU). That is the same layer with the kernel and bias

  W' = W . s   (each output channel's filter times its scale),   b' = b . s + t,

which `fold` computes, so the model stays a plain VGG (the paper's re-parameterisation).
The scale starts at one and the shift at zero, so step 0 is the loaded model bit for bit
(x * 1 and x + 0 are exact). Counts: 2 Cout per adapted layer. peft has no SSF; the tests
check the fold against the closed form above.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from ftlab.plans import registry, tuners
from ftlab.plans.registry import Call, Param

SCALE, SHIFT = 'ssf_scale', 'ssf_shift'


@registry.register
class SSF(tuners.Tuner):
  name = 'ssf'
  params = (Param('train_head', True),)
  summary = (
    'a scale and a shift of each output channel of every frozen conv and dense kernel outside '
    "the head, folded into the layer's kernel and bias (W s, b s + t) + head"
  )
  paper = 'Lian et al., NeurIPS 2022'
  title = 'SSF'
  leaves = (SCALE, SHIFT)

  def adapters(self, call: Call, kernel: Any, key: jax.Array) -> dict[str, Any]:
    """Scale `[Cout]` ones and shift `[Cout]` zeros, in the kernel's dtype (`key` unused: SSF
    starts deterministic)."""
    shape = (kernel.shape[-1],)
    return {SCALE: jnp.ones(shape, kernel.dtype), SHIFT: jnp.zeros(shape, kernel.dtype)}

  def fold(self, layer: Mapping[str, Any]) -> dict[str, Any]:
    """`kernel * s` (s broadcast over the output axis) and `bias * s + t`.

    Raises:
      KeyError: a layer without a bias (every VGG conv and dense layer has one, BatchNorm
        variants included).
    """
    plain = {k: v for k, v in layer.items() if k not in self.leaves}
    scale, shift = layer[SCALE], layer[SHIFT]
    plain['kernel'] = (layer['kernel'] * scale).astype(layer['kernel'].dtype)
    plain['bias'] = (layer['bias'] * scale + shift).astype(layer['bias'].dtype)
    return plain
