"""Per-element masks of a fixed density: random, magnitude and Fisher (FISH) selections.

Each chooses exactly `round(density * n)` entries of the backbone's n (the head trains whole
unless `train_head=False`), once, from the loaded weights or the training data:

- `random_sparse(density, seed=0)`: uniformly at random (an ablation baseline).
- `magnitude(density, which='largest')`: by |w| of the loaded weights.
- `fisher(density, num_batches=None)`: FISH mask (Sung et al., NeurIPS 2021): the top entries
  by the empirical Fisher's diagonal, the mean squared per-example gradient over
  `num_batches` shuffled training batches (every training example once if None), the model
  in inference mode.

Each takes `alloc`: how the share is spread over the leaves, `'global'` (one ranking over the
whole backbone, the default), `'uniform'` (the same density in every leaf) or `'erk'`
(Erdős–Rényi-kernel densities, RigL); `ftlab.plans.selection.allocate`.

The mask multiplies the *updates* after the optimizer (`ftlab.plans.optim`), so masked
entries stay bit-identical under momentum, Adam and weight decay.
"""

from __future__ import annotations

import numpy as np

from ftlab.plans import registry
from ftlab.plans.registry import Call, Param, PlanError
from ftlab.plans.selection import Context, ElementSelector, int_seed, optional_batches, value


@registry.register
class RandomSparse(ElementSelector):
  name = 'random_sparse'
  params = (Param('density'), Param('seed', 0), Param('train_head', True), Param('alloc', 'global'))
  summary = "a share `density` of the backbone's entries, uniformly at random"

  def check(self, call: Call) -> None:
    int_seed(call)

  def entry_scores(self, call: Call, ctx: Context, paths: list[str]) -> dict[str, np.ndarray]:
    # One generator drawn in sorted path order: the same seed gives the same mask on every
    # process and launch.
    rng = np.random.default_rng(int_seed(call))
    return {p: rng.random(ctx.shapes[p], np.float32) for p in paths}


def check_which(call: Call) -> str:
  """`which` of a magnitude call: `largest` or `smallest`.

  Raises:
    PlanError: naming the value.
  """
  which = value(call, 'which', 'largest')
  if which not in ('largest', 'smallest'):
    raise PlanError(f"policy magnitude: which={which!r} is not 'largest' or 'smallest'")
  return which


@registry.register
class Magnitude(ElementSelector):
  name = 'magnitude'
  params = (
    Param('density'),
    Param('which', 'largest'),
    Param('train_head', True),
    Param('alloc', 'global'),
  )
  summary = "by |w| of the loaded weights (`'smallest'` for the other end)"

  def check(self, call: Call) -> None:
    check_which(call)

  def entry_scores(self, call: Call, ctx: Context, paths: list[str]) -> dict[str, np.ndarray]:
    sign = 1.0 if check_which(call) == 'largest' else -1.0
    # Negated for `smallest`, so one top-k serves both ends.
    return {p: sign * np.abs(np.asarray(ctx.params[p], np.float32)) for p in paths}


@registry.register
class Fisher(ElementSelector):
  name = 'fisher'
  params = (
    Param('density'),
    Param('num_batches', None),
    Param('train_head', True),
    Param('alloc', 'global'),
  )
  summary = (
    'FISH mask: the top mean squared per-example gradient over `num_batches` shuffled '
    'training batches (all training examples once if None), model in inference mode'
  )
  paper = 'Sung et al., NeurIPS 2021'
  scores = 'fisher'

  def check(self, call: Call) -> None:
    optional_batches(call)

  def entry_scores(self, call: Call, ctx: Context, paths: list[str]) -> dict[str, np.ndarray]:
    found = ctx.scores('fisher', optional_batches(call), call.name)
    return {p: found[p] for p in paths}
