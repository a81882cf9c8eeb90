"""An exponential moving average of the weights, kept for what a plan can change.

With `config.ema_decay = d` the train step keeps `ema <- d * ema + (1 - d) * params` after
every update (as timm's `ModelEmaV2` and big_vision's `ema` do), but only for the entries the
plan can change: each trainable leaf whole, or the flat indices of the entries a per-element
plan trains (or resamples). Frozen leaves and frozen entries never change, so their average
is their value and nothing is stored for them. The average lives in `TrainState.ema`, a tree
like `params` holding only those leaves, so checkpoints save it and a resume continues it bit
for bit; a stage boundary restarts it from the current weights (`init`). The averaged model
is the state's parameters with the EMA written into the kept entries (`params_with_ema`),
evaluated beside the raw weights by the classification evaluator.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np

from ftlab import paths
from ftlab.parallel import REPLICATED
from ftlab.plans import policies

PyTree = Any
Entries = Mapping[str, np.ndarray | None]


def entries(plan: policies.Plan) -> dict[str, np.ndarray | None]:
  """Which entries the EMA keeps: `{path: None}` for a trainable leaf kept whole, `{path:
  flat indices}` for one a per-element plan trains in part; frozen leaves (and leaves none
  of whose entries train) are left out."""
  found = {}
  for path, trainable in plan.flat_mask().items():
    levels = plan.element_levels.get(path)
    if not trainable:
      continue
    # RESAMPLED entries count as changing: Child-Tuning_F may update any of them on a step.
    whole = levels is None or (np.ndim(levels) == 0 and levels == policies.TRAINED)
    # Static numpy indices, fixed when the step is traced: the gather and scatter below have
    # constant shapes, and a plan's entries cannot change during a stage (`run.check_plans`
    # refuses an EMA with a dynamic mask).
    indices = None if whole else np.flatnonzero(np.ravel(levels) != policies.FROZEN)
    if indices is None or len(indices):  # a leaf none of whose entries train never changes
      found[path] = indices
  return found


def kept(x: jnp.ndarray, indices: np.ndarray | None) -> jnp.ndarray:
  """The kept entries of one leaf: the leaf itself, or its flat entries at `indices`."""
  return x if indices is None else x.reshape(-1)[indices]


def init(params: PyTree, kept_entries: Entries) -> PyTree:
  """The EMA's starting value: the kept entries of `params`."""
  flat = paths.flatten(params)
  return paths.unflatten({p: jnp.asarray(kept(flat[p], i)) for p, i in kept_entries.items()})


def update(ema: PyTree, params: PyTree, kept_entries: Entries, decay: float) -> PyTree:
  """`decay * ema + (1 - decay) * params` on the kept entries (traced inside the step)."""
  flat, old = paths.flatten(params), paths.flatten(ema)
  return paths.unflatten(
    {p: decay * old[p] + (1.0 - decay) * kept(flat[p], i) for p, i in kept_entries.items()}
  )


def params_with_ema(params: PyTree, ema: PyTree, kept_entries: Entries) -> PyTree:
  """`params` with the EMA in place of the kept entries: the averaged model's parameters."""
  flat, averaged = paths.flatten(params), paths.flatten(ema)
  for p, i in kept_entries.items():
    x = flat[p]
    if i is None:
      flat[p] = averaged[p]
    else:
      flat[p] = jnp.asarray(x).reshape(-1).at[i].set(averaged[p]).reshape(x.shape)
  return paths.unflatten(flat)


def compile_averaged_state(spread: Any, plan: policies.Plan) -> Callable:
  """`p_averaged(state)`: the replicated state with the EMA in place of the parameters it
  averages, for an eval step (BatchNorm keeps its running statistics)."""
  kept_entries = entries(plan)
  # On the devices: the averaged state is made from the replicated one without a trip through
  # the host, at every eval.
  swap = lambda state: state.replace(params=params_with_ema(state.params, state.ema, kept_entries))
  return spread.compile(swap, in_kinds=(REPLICATED,))
