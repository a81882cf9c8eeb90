"""Masks that change during training: re-selection and RigL's drop-and-grow, compiled.

A dynamic plan (`reselect(...)`, `rigl(...)`, see `ftlab.plans.sparse_masks.DynamicMask`) keeps its
current mask where every per-element mask lives: the entry levels in the optimizer state
(`ftlab.plans.optim.EntryMaskState`), which the step reads and checkpoints save and restore. So a
resumed run continues with the mask it stopped with, and a change of mask is a change of that
state, made between steps by `remask`, a pure function the run compiles once with `jax.jit`:

- `reselect`: the `count` entries of the scope with the largest scores (the Fisher estimated
  again on the current weights, or the current weights' magnitude) form the new mask.
- `rigl` (Evci et al., ICML 2020, "Rigging the Lottery"): drop the `round(fraction * count)`
  trained entries of smallest magnitude, grow as many of the entries that were not trained
  by the largest gradient magnitude (the dropped ones cannot come straight back).

The count is exact at every step: a top-k by a stable sort of the scores, ties going to the
lower index in the scope's flat order (sorted paths, row-major entries), NaN scores last.
Entries that leave the mask keep the value they reached. The optimizer moments (Adam's `mu`
and `nu`, SGD's momentum `trace`) of every entry that enters or leaves the mask are set to
zero; Adam's step count, shared by all entries, is kept, so an entering entry's first update
is bias-corrected by the run's step, not by its own (as in RigL's reference code, which zeroes
the momentum of grown weights). Leaving entries' moments are reset only for tidiness: the mask
zeroes their updates whatever the moments hold.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from ftlab import paths
from ftlab.plans.optim import EntryMaskState
from ftlab.plans.sparse_masks import FROZEN, TRAINED, DynamicMask

PyTree = Any
_MOMENTS = {optax.ScaleByAdamState: ('mu', 'nu'), optax.TraceState: ('trace',)}


def _flat_order(values: Mapping[str, jnp.ndarray], scope: tuple[str, ...]) -> jnp.ndarray:
  return jnp.concatenate([jnp.ravel(values[p]) for p in scope])


def _unflat(flat: jnp.ndarray, like: Mapping[str, Any], scope: tuple[str, ...]) -> dict:
  out, offset = {}, 0
  for p in scope:
    size = int(jnp.size(like[p]))
    out[p] = flat[offset : offset + size].reshape(jnp.shape(like[p]))
    offset += size
  return out


def _top(flat: jnp.ndarray, count: int) -> jnp.ndarray:
  """Boolean: the `count` largest entries; ties to the lower index, NaN last."""
  flat = jnp.where(jnp.isnan(flat), -jnp.inf, flat.astype(jnp.float32))
  order = jnp.argsort(-flat, stable=True)
  return jnp.zeros(flat.shape, bool).at[order[:count]].set(True)


def top_count(
  scores: Mapping[str, jnp.ndarray], count: int, scope: tuple[str, ...]
) -> dict[str, jnp.ndarray]:
  """Exactly `count` entries with the largest scores over the `scope` leaves together.

  Args:
    scores: `{path: float array}` for at least the paths of `scope`.
    count: how many entries to choose (static).
    scope: the paths, in the order that breaks ties (lower flat index first).

  Returns:
    `{path: bool array}` of the scores' shapes, `count` True in all.
  """
  return _unflat(_top(_flat_order(scores, scope), count), scores, scope)


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
  active = _flat_order(trained, scope)
  size = active.size
  swap = min(int(round(fraction * count)), size - count)
  lowest = jnp.finfo(jnp.float32).min  # above -inf: any active entry outranks an inactive one
  keep_score = jnp.nan_to_num(-_flat_order(magnitudes, scope).astype(jnp.float32), nan=lowest)
  drop = _top(jnp.where(active, jnp.maximum(keep_score, lowest), -jnp.inf), swap)
  grow_score = jnp.nan_to_num(_flat_order(growth, scope).astype(jnp.float32), nan=lowest)
  grow = _top(jnp.where(active, -jnp.inf, jnp.maximum(grow_score, lowest)), swap)
  return _unflat((active & ~drop) | grow, trained, scope)


def _levels_of(opt_state: PyTree) -> dict[str, jnp.ndarray]:
  """The entry levels in an optimizer state, by path."""
  found = {}

  def visit(node):
    if isinstance(node, EntryMaskState):
      flat, _ = jax.tree_util.tree_flatten_with_path(node.levels, is_leaf=lambda x: x is None)
      found.update({paths.from_key_path(kp): x for kp, x in flat if x is not None})
    return node

  jax.tree.map(visit, opt_state, is_leaf=lambda x: isinstance(x, EntryMaskState))
  return found


def current_mask(opt_state: PyTree, scope: tuple[str, ...]) -> dict[str, jnp.ndarray]:
  """`{path: bool array}`: the entries of `scope` the optimizer state currently trains."""
  levels = _levels_of(opt_state)
  return {p: levels[p] == TRAINED for p in scope}


def with_mask(opt_state: PyTree, mask: Mapping[str, jnp.ndarray]) -> PyTree:
  """The optimizer state training `mask`'s entries, with the moments of every entry whose
  membership changed set to zero (see the module docstring)."""
  old = _levels_of(opt_state)
  changed = {p: (old[p] == TRAINED) != m for p, m in mask.items()}

  def by_path(tree, fn):
    def leaf(kp, x):
      p = paths.from_key_path(kp)
      return fn(p, x) if p in mask and x is not None else x

    return jax.tree_util.tree_map_with_path(leaf, tree, is_leaf=lambda x: x is None)

  def update(node):
    if isinstance(node, EntryMaskState):
      levels = by_path(
        node.levels, lambda p, x: jnp.where(mask[p], TRAINED, FROZEN).astype(x.dtype)
      )
      return node._replace(levels=levels)
    for kind, fields in _MOMENTS.items():
      if isinstance(node, kind):
        reset = lambda p, x: jnp.where(changed[p], jnp.zeros_like(x), x)
        return node._replace(**{f: by_path(getattr(node, f), reset) for f in fields})
    return node

  kinds = (EntryMaskState, *_MOMENTS)
  return jax.tree.map(update, opt_state, is_leaf=lambda x: isinstance(x, kinds))


def remask(
  opt_state: PyTree, params: PyTree, scores: Mapping[str, jnp.ndarray], *, dynamic: DynamicMask
) -> tuple[PyTree, dict]:
  """The optimizer state with the next mask of `dynamic`; compile with `jax.jit`.

  Args:
    opt_state: the host optimizer state of the plan (holds the current mask).
    params: the current parameters (the magnitudes of `magnitude` and rigl's drop).
    scores: `{path: array}` of the scope: the Fisher for `reselect(fisher(...))`, the
      gradient for `rigl` (its magnitude is taken here); ignored for `magnitude`.
    dynamic: the plan's `DynamicMask` (static).

  Returns:
    `(opt_state, stats)`: `stats` has `entered` (entries new to the mask) and `trained`
    (entries in the new mask, always `dynamic.count`).
  """
  scope, flat = dynamic.scope, paths.flatten(params)
  before = current_mask(opt_state, scope)
  magnitudes = {p: jnp.abs(flat[p]) for p in scope}
  if dynamic.kind == 'rigl':
    growth = {p: jnp.abs(scores[p]) for p in scope}
    mask = rigl_choice(before, magnitudes, growth, dynamic.count, dynamic.fraction, scope)
  elif dynamic.score == 'magnitude':
    sign = 1.0 if dynamic.which == 'largest' else -1.0
    mask = top_count({p: sign * m for p, m in magnitudes.items()}, dynamic.count, scope)
  else:
    mask = top_count(scores, dynamic.count, scope)
  stats = {
    'entered': sum(jnp.sum(mask[p] & ~before[p]) for p in scope),
    'trained': sum(jnp.sum(mask[p]) for p in scope),
  }
  return with_mask(opt_state, mask), stats


def compile_remask(dynamic: DynamicMask):
  """`remask` for `dynamic`, jitted: `(opt_state, params, scores) -> (opt_state, stats)`."""
  return jax.jit(functools.partial(remask, dynamic=dynamic))


def is_due(dynamic: DynamicMask | None, steps_done: int) -> bool:
  """Whether the mask changes before step `steps_done + 1`."""
  return dynamic is not None and steps_done > 0 and steps_done % dynamic.every == 0
