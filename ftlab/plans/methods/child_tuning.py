"""Child-Tuning (Xu et al., EMNLP 2021): train a child network of the backbone.

- `child_tuning_d(p, num_batches=None)`: Child-Tuning_D, a fixed child network of the share
  `p` of entries with the largest Fisher information (the FISH ranking, `fisher`).
- `child_tuning_f(p)`: Child-Tuning_F, a fresh Bernoulli(p) mask every step, the kept
  updates scaled by 1/p. Unlike the paper, which masks gradients, the mask multiplies the
  *updates* after the optimizer (the same for plain SGD); the key lives in the optimizer
  state, so a resumed run draws the same masks.
"""

from __future__ import annotations

import numpy as np

from ftlab.plans import registry
from ftlab.plans.registry import Call, Param, Selector
from ftlab.plans.selection import (
  FROZEN,
  RESAMPLED,
  TRAINED,
  Context,
  ElementSelector,
  fraction,
  optional_batches,
)


@registry.register
class ChildTuningD(ElementSelector):
  name = 'child_tuning_d'
  params = (Param('p'), Param('num_batches', None), Param('train_head', True))
  summary = 'Child-Tuning_D: the Fisher ranking, a fixed child network of share `p`'
  paper = 'Xu et al., EMNLP 2021'
  scores = 'fisher'
  density = 'p'

  def check(self, call: Call) -> None:
    optional_batches(call)

  def entry_scores(self, call: Call, ctx: Context, paths: list[str]) -> dict[str, np.ndarray]:
    found = ctx.scores('fisher', optional_batches(call), call.name)
    return {p: found[p] for p in paths}


@registry.register
class ChildTuningF(Selector):
  name = 'child_tuning_f'
  params = (Param('p'), Param('train_head', True))
  summary = 'Child-Tuning_F: a fresh Bernoulli(`p`) mask every step, kept updates scaled by 1/p'
  paper = 'Xu et al., EMNLP 2021'
  per_element = True

  def select(self, call: Call, ctx: Context) -> dict[str, int]:
    """Every backbone entry is RESAMPLED; `ctx.resample_p` carries p to the optimizer."""
    ctx.resample_p = fraction(call, 'p')
    backbone, head = set(ctx.backbone), ctx.head_if(call)
    # Every backbone entry may be updated on some step, so the optimizer keeps dense moments for
    # all of them; the per-step draw happens in `optim.mask_entries`.
    return {p: TRAINED if p in head else RESAMPLED if p in backbone else FROZEN for p in ctx.paths}
