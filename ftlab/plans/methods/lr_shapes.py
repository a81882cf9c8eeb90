"""Learning rates by depth: layer-wise decay (as in BEiT/MAE fine-tuning) and ULMFiT's
discriminative rates. At most one of them per plan.

- `layerwise_lr_decay(decay)`: lr times `decay^(L-1-l)` over the blocks l = 0..L-1, the head
  last (0.65-0.75 in MAE fine-tuning).
- `discriminative_lr(factor)` (Howard & Ruder, ACL 2018): lr divided by `factor` per conv or
  dense layer going down (2.6 in ULMFiT), a layer taken together with its BatchNorm.
"""

from __future__ import annotations

from typing import Any

from ftlab import paths as paths_
from ftlab.plans import registry
from ftlab.plans.registry import Call, Modifier, Param, PlanError


def _by_depth(paths: list[str], units: list[set[str]], rate: float) -> dict[str, float]:
  """`rate^(top - depth)` per path, a path's depth that of its layer's unit (the top unit's
  for layers in none)."""
  depth = {layer: i for i, unit in enumerate(units) for layer in unit}
  top = len(units) - 1
  # A layer in no unit (none in VGG today) is treated as the top, at the full rate.
  return {p: float(rate ** (top - depth.get(paths_.layer_of(p), top))) for p in paths}


def _check_rate(rate: Any, what: str, value: Any) -> None:
  if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
    raise PlanError(f'{what}={value!r} is out of range (decay in (0, 1], factor >= 1)')


@registry.register
class LayerwiseLrDecay(Modifier):
  name = 'layerwise_lr_decay'
  params = (Param('decay'),)
  summary = 'lr x decay^(L-l) over blocks, head last'
  paper = 'Clark et al., ICLR 2020; Bao et al., ICLR 2022'
  group = 'lr_shape'

  def lr_scale(self, call: Call, paths: list[str], structure: Any) -> dict[str, float]:
    decay = call.get('decay')
    _check_rate(decay, 'layerwise_lr_decay: decay', decay)
    return _by_depth(paths, [set(b.layers) for b in structure.all_blocks], decay)


@registry.register
class DiscriminativeLr(Modifier):
  name = 'discriminative_lr'
  params = (Param('factor'),)
  summary = 'lr / factor per conv or dense layer going down'
  paper = 'Howard & Ruder, ACL 2018'
  group = 'lr_shape'

  def lr_scale(self, call: Call, paths: list[str], structure: Any) -> dict[str, float]:
    factor = call.get('factor')
    # A factor becomes a per-unit rate in (0, 1]; a bad factor passes through unchanged so the
    # check below names it.
    number = isinstance(factor, (int, float)) and not isinstance(factor, bool)
    rate = 1.0 / factor if number and factor > 0 else factor
    _check_rate(rate, 'discriminative_lr: factor', factor)
    # One unit per conv or dense layer with its BatchNorm: the norm's scale and shift train at
    # the rate of the layer they follow.
    layers = [l for b in structure.all_blocks for l in b.layers if not l.endswith('_bn')]
    return _by_depth(paths, [{l, f'{l}_bn'} for l in layers], rate)
