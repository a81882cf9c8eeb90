"""SNIP saliency (Lee et al., ICLR 2019) as a per-element fine-tuning mask.

`snip(density, num_batches=None, train_head=True, alloc='global')` trains the share `density`
of the backbone's entries with the largest connection sensitivity |θ ⊙ ∇θ L|: the loaded
weight times the mean loss gradient over `num_batches` shuffled training batches (every
training example once if None), the model in inference mode (the run's `gradient` score pass,
`ftlab.scoring.gradient_step`: summed gradients divided by the number of examples). SNIP
prunes at initialisation by the same score, normalised by its sum; the normalisation does not
change the ranking, so it is left out. PEFT work uses it as a saliency for which entries to
tune, as here.
"""

from __future__ import annotations

import numpy as np

from ftlab.plans import registry
from ftlab.plans.registry import Call, Param
from ftlab.plans.selection import Context, ElementSelector, optional_batches


def snip_scores(ctx: Context, paths: list[str], num_batches: int | None, who: str) -> dict:
  """`{path: |θ ⊙ g|}` (float32, the leaf's shape) of `paths`, g the mean loss gradient; -inf
  on leaves the score pass did not differentiate.

  Raises:
    PlanError: the plan is made without a score pass.
  """
  grads = ctx.scores('gradient', num_batches, who)
  out = {}
  for p in paths:
    g = np.asarray(grads[p], np.float32)
    # -inf: a leaf the score pass left out (`Context.scores`) stays last, not |w * -inf| = inf
    # (nor 0 * -inf = nan where w is 0).
    unscored = np.isneginf(g)
    score = np.abs(np.asarray(ctx.params[p], np.float32) * np.where(unscored, 0.0, g))
    out[p] = np.where(unscored, -np.inf, score).astype(np.float32)
  return out


@registry.register
class Snip(ElementSelector):
  name = 'snip'
  params = (
    Param('density'),
    Param('num_batches', None),
    Param('train_head', True),
    Param('alloc', 'global'),
  )
  summary = (
    'by |w * mean gradient| (connection sensitivity) over `num_batches` training batches '
    '(all training examples once if None)'
  )
  paper = 'Lee et al., ICLR 2019'
  scores = 'gradient'

  def check(self, call: Call) -> None:
    optional_batches(call)

  def entry_scores(self, call: Call, ctx: Context, paths: list[str]) -> dict[str, np.ndarray]:
    return snip_scores(ctx, paths, optional_batches(call), call.name)
