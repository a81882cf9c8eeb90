"""`reselect(policy, every)`: a per-element mask chosen again every `every` steps.

The inner policy (`fisher(density, num_batches=None)` or `magnitude(density, which=...)`)
chooses the first mask on the loaded weights, as it would alone, and then again every `every`
steps on the current weights: the Fisher estimated again (over the `num_batches` training
batches of the steps to come, unaugmented, so a resumed run chooses the same mask) or the
current magnitudes. The count, `round(density * scope size)`, is exact at every change; the
scope is the backbone or the `blocks` given, and the head trains whole unless
`train_head=False`.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ftlab.plans import dynamic_masks, registry
from ftlab.plans.methods.sparse import check_which
from ftlab.plans.registry import Call, Param, PlanError
from ftlab.plans.selection import (
  FROZEN,
  TRAINED,
  Context,
  blocks_scope,
  fraction,
  levels_of,
  optional_batches,
  positive_int,
  top_count,
)

CHOOSES_BY = ('fisher', 'magnitude')


@registry.register
class Reselect(registry.Dynamic):
  name = 'reselect'
  params = (
    Param('policy', calls=CHOOSES_BY),
    Param('every'),
    Param('blocks', None),
    Param('train_head', True),
  )
  summary = (
    'the inner `fisher(...)` or `magnitude(...)` mask, chosen again on the current weights '
    'every `every` steps'
  )

  def select(self, call: Call, ctx: Context) -> dict[str, Any]:
    every = positive_int(call, 'every')
    inner = call.get('policy')
    density = fraction(inner, 'density')
    which = check_which(inner) if inner.name == 'magnitude' else 'largest'
    num_batches = optional_batches(inner) if inner.name == 'fisher' else None
    # At density 1 every entry is always chosen: nothing could change, and the dynamic engine's
    # scores and remasks would be pure cost.
    if density >= 1:
      raise PlanError(f'policy reselect: density={density!r} leaves nothing to change; use < 1')
    scope, head = blocks_scope(ctx, call), ctx.head_if(call)
    levels = {p: TRAINED if p in head else FROZEN for p in ctx.paths}
    # From shapes only, so the plan made on shapes and the real one agree on the count, which
    # the compiled remask step takes as static.
    count = int(round(density * sum(np.prod(ctx.shapes[p], dtype=int) for p in scope)))
    options = (('which', which),) if inner.name == 'magnitude' else ()
    ctx.dynamic = dynamic_masks.DynamicMask(
      'reselect', every, tuple(sorted(scope)), count, inner.name, num_batches, options
    )
    if ctx.params is None:  # shapes only: the count needs no values, the mask does
      ctx.pending = True
      return {**levels, **dict.fromkeys(scope, TRAINED)}
    scores = registry.get(inner.name).entry_scores(inner, ctx, ctx.dynamic.scope)
    return {**levels, **levels_of(top_count(scores, count))}

  def scores_needed(self, call: Call) -> str:
    inner = call.get('policy')
    return registry.get(inner.name).scores if inner is not None else ''

  def next_mask(self, before: Mapping, magnitudes: Mapping, scores: Mapping, dynamic) -> dict:
    """The top `count` entries by the Fisher, or by magnitude (`which` end)."""
    if dynamic.score == 'magnitude':
      sign = 1.0 if dynamic.option('which', 'largest') == 'largest' else -1.0
      scores = {p: sign * m for p, m in magnitudes.items()}
    return dynamic_masks.top_count(scores, dynamic.count, dynamic.scope)

  def describe(self, dynamic) -> str:
    return 'chosen again'
