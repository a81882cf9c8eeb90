"""Masks that change during training: the engine every dynamic method runs on.

A dynamic plan (`reselect(...)`, `rigl(...)`: `ftlab.plans.methods`) keeps its current mask
where every per-element mask lives: the entry levels in the optimizer state
(`ftlab.plans.optim.EntryMaskState`), which the step reads and checkpoints save and restore.
So a resumed run continues with the mask it stopped with, and a change of mask is a change of
that state, made between steps by `remask`, a pure function compiled once per plan. The
method decides the next mask (`registry.Dynamic.next_mask`) from the current one, the
weights' magnitudes and the scores of its `DynamicMask.score` pass; this module keeps the
count exact and the optimizer state consistent:

The count is exact at every step: a top-k by a stable sort of the scores, ties going to the
lower index in the scope's flat order (sorted paths, row-major entries), NaN scores last.
Entries that leave the mask keep the value they reached. The optimizer moments (Adam's `mu`
and `nu`, SGD's momentum `trace`) of every entry that enters or leaves the mask are set to
zero (`optim.with_entry_mask`); Adam's step count, shared by all entries, is kept, so an
entering entry's first update is bias-corrected by the run's step, not by its own (as in
RigL's reference code, which zeroes the momentum of grown weights).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from ftlab import paths
from ftlab.plans import optim, registry
from ftlab.plans.selection import TRAINED

PyTree = Any


@dataclasses.dataclass(frozen=True)
class DynamicMask:
  """How a per-element mask changes during training (hashable: a static argument of jit).

  Attributes:
    kind: the dynamic method's name (`reselect`, `rigl`): it chooses each next mask.
    every: steps between changes: the mask changes before step `every * i + 1`, i >= 1.
    scope: the leaves whose entries the mask chooses among, in sorted path order.
    count: the entries chosen at every step (`round(density * scope size)`).
    score: the pass its next masks read: `fisher` or `gradient` (computed by the run on the
      current weights), or `magnitude` (the weights themselves, no pass).
    num_batches: batches of the Fisher or gradient estimate (None: every training example).
    options: the method's own settings, as `(name, value)` pairs (rigl's `fraction`).
  """

  kind: str
  every: int
  scope: tuple[str, ...]
  count: int
  score: str
  num_batches: int | None = None
  options: tuple[tuple[str, Any], ...] = ()

  def option(self, key: str, default: Any = None) -> Any:
    return dict(self.options).get(key, default)


def flat_order(values: Mapping[str, jnp.ndarray], scope: tuple[str, ...]) -> jnp.ndarray:
  """The scope's leaves as one vector, in tie-breaking order."""
  return jnp.concatenate([jnp.ravel(values[p]) for p in scope])


def unflat(flat: jnp.ndarray, like: Mapping[str, Any], scope: tuple[str, ...]) -> dict:
  """`flat_order`'s inverse: `{path: array}` of `like`'s shapes."""
  out, offset = {}, 0
  for p in scope:
    size = int(jnp.size(like[p]))
    out[p] = flat[offset : offset + size].reshape(jnp.shape(like[p]))
    offset += size
  return out


def top(flat: jnp.ndarray, count: int) -> jnp.ndarray:
  """Boolean: the `count` largest entries; ties to the lower index, NaN last."""
  # NaN becomes -inf, so it ranks last by value rather than by a sort's NaN convention; in
  # float32, so the traced choice and its numpy twin (`selection.top_count`) rank the same
  # values.
  flat = jnp.where(jnp.isnan(flat), -jnp.inf, flat.astype(jnp.float32))
  # A stable sort of the negated scores: the count is exact and ties go to the lower flat
  # index, as in the numpy twin.
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
  return unflat(top(flat_order(scores, scope), count), scores, scope)


def current_mask(opt_state: PyTree, scope: tuple[str, ...]) -> dict[str, jnp.ndarray]:
  """`{path: bool array}`: the entries of `scope` the optimizer state currently trains."""
  levels = optim.entry_levels(opt_state)
  return {p: levels[p] == TRAINED for p in scope}


def remask(
  opt_state: PyTree, params: PyTree, scores: Mapping[str, jnp.ndarray], *, dynamic: DynamicMask
) -> tuple[PyTree, dict]:
  """The optimizer state with the next mask of `dynamic`; compile with `jax.jit`.

  Args:
    opt_state: the plan's optimizer state (holds the current mask).
    params: the current parameters (their magnitudes are the methods' drop criterion).
    scores: `{path: array}` of the scope from the `dynamic.score` pass (the Fisher for
      `reselect(fisher(...))`, the gradient for `rigl`); ignored by magnitude rules.
    dynamic: the plan's `DynamicMask` (static).

  Returns:
    `(opt_state, stats)`: `stats` has `entered` (entries new to the mask) and `trained`
    (entries in the new mask, always `dynamic.count`).
  """
  scope, flat = dynamic.scope, paths.flatten(params)
  before = current_mask(opt_state, scope)
  magnitudes = {p: jnp.abs(flat[p]) for p in scope}
  mask = registry.get(dynamic.kind).next_mask(before, magnitudes, scores, dynamic)
  stats = {
    # Traced sums, fetched by the caller for its log line only.
    'entered': sum(jnp.sum(mask[p] & ~before[p]) for p in scope),
    'trained': sum(jnp.sum(mask[p]) for p in scope),
  }
  return optim.with_entry_mask(opt_state, mask), stats


def compile_remask(dynamic: DynamicMask):
  """`remask` for `dynamic`, jitted: `(opt_state, params, scores) -> (opt_state, stats)`."""
  return jax.jit(functools.partial(remask, dynamic=dynamic))


def is_due(dynamic: DynamicMask | None, steps_done: int) -> bool:
  """Whether the mask changes before step `steps_done + 1`."""
  # Never before the first step: the first mask was chosen when the plan was made.
  return dynamic is not None and steps_done > 0 and steps_done % dynamic.every == 0
