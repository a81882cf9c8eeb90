"""RigL (Evci et al., ICML 2020, "Rigging the Lottery"): a sparse mask that drops and grows.

`rigl(density, every, fraction, num_batches=1, seed=0, blocks=None)` starts from a random
mask of `round(density * scope size)` entries (uniform over the scope here, not RigL's ERK);
every `every` steps the `round(fraction * count)` trained entries of smallest |w| leave and as
many untrained entries of largest |mean gradient| (over `num_batches` batches, inference
mode) enter; the dropped ones cannot come straight back. The drop fraction is constant (RigL
anneals it).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from ftlab.plans import dynamic_masks, registry
from ftlab.plans.dynamic_masks import flat_order, top, unflat
from ftlab.plans.methods.sparse import RandomSparse
from ftlab.plans.registry import Call, Param, PlanError
from ftlab.plans.selection import (
  FROZEN,
  TRAINED,
  Context,
  blocks_scope,
  fraction,
  int_seed,
  levels_of,
  positive_int,
  top_count,
)


def rigl_choice(
  trained: Mapping[str, jnp.ndarray],
  magnitudes: Mapping[str, jnp.ndarray],
  growth: Mapping[str, jnp.ndarray],
  count: int,
  fraction: float,
  scope: tuple[str, ...],
) -> dict[str, jnp.ndarray]:
  """RigL's drop-and-grow: the `round(fraction * count)` trained entries of smallest
  magnitude leave, as many untrained entries of largest `growth` enter.

  Args:
    trained: `{path: bool array}`, the current mask (`count` entries).
    magnitudes: `{path: |weight|}`, the drop criterion.
    growth: `{path: |gradient|}`, the grow criterion.
    count: entries in the mask (static; unchanged by the update).
    fraction: share of `count` swapped, in (0, 1] (static).
    scope: the paths, in tie-breaking order.

  Returns:
    The new `{path: bool array}` mask, `count` True in all.
  """
  active = flat_order(trained, scope)
  size = active.size
  # No more can grow than there are untrained entries; at most `count` can drop since
  # fraction <= 1.
  swap = min(int(round(fraction * count)), size - count)
  lowest = jnp.finfo(jnp.float32).min  # above -inf: any active entry outranks an inactive one
  keep_score = jnp.nan_to_num(-flat_order(magnitudes, scope).astype(jnp.float32), nan=lowest)
  drop = top(jnp.where(active, jnp.maximum(keep_score, lowest), -jnp.inf), swap)
  # Growth ranks the entries that were inactive before this change, so an entry dropped just
  # now cannot come straight back.
  grow_score = jnp.nan_to_num(flat_order(growth, scope).astype(jnp.float32), nan=lowest)
  grow = top(jnp.where(active, -jnp.inf, jnp.maximum(grow_score, lowest)), swap)
  # `drop` lies in the active set and `grow` outside it, both of size `swap`: the count is
  # unchanged.
  return unflat((active & ~drop) | grow, trained, scope)


@registry.register
class RigL(registry.Dynamic):
  name = 'rigl'
  params = (
    Param('density'),
    Param('every'),
    Param('fraction'),
    Param('num_batches', 1),
    Param('seed', 0),
    Param('blocks', None),
    Param('train_head', True),
  )
  summary = (
    'a random first mask; every `every` steps the `fraction` of trained entries of smallest '
    '|w| leave and as many untrained entries of largest |mean gradient| enter'
  )
  paper = 'Evci et al., ICML 2020'

  def select(self, call: Call, ctx: Context) -> dict[str, Any]:
    every = positive_int(call, 'every')
    density, swap = fraction(call, 'density'), fraction(call, 'fraction')
    num_batches = positive_int(call, 'num_batches', 1)
    int_seed(call)
    if density >= 1:
      raise PlanError(f'policy rigl: density={density!r} leaves nothing to change; use < 1')
    scope, head = blocks_scope(ctx, call), ctx.head_if(call)
    levels = {p: TRAINED if p in head else FROZEN for p in ctx.paths}
    count = int(round(density * sum(np.prod(ctx.shapes[p], dtype=int) for p in scope)))
    ctx.dynamic = dynamic_masks.DynamicMask(
      'rigl', every, tuple(sorted(scope)), count, 'gradient', num_batches, (('fraction', swap),)
    )
    if ctx.params is None:  # shapes only: the count needs no values, the mask does
      ctx.pending = True
      return {**levels, **dict.fromkeys(scope, TRAINED)}
    # The first mask is random, as RigL's, but over the scope uniformly rather than by ERK.
    scores = RandomSparse().entry_scores(call, ctx, ctx.dynamic.scope)
    return {**levels, **levels_of(top_count(scores, count))}

  def next_mask(self, before: Mapping, magnitudes: Mapping, scores: Mapping, dynamic) -> dict:
    growth = {p: jnp.abs(scores[p]) for p in dynamic.scope}
    swap = dynamic.option('fraction')
    return rigl_choice(before, magnitudes, growth, dynamic.count, swap, dynamic.scope)

  def describe(self, dynamic) -> str:
    return f'drop and grow {dynamic.option("fraction"):g} of them'
