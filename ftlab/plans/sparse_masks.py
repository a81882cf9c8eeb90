"""Per-element policies: which single entries of the backbone train.

Each policy maps `(paths, block structure, call, context)` to `{path: entry levels}`, where
a level is FROZEN, RESAMPLED (Child-Tuning_F: kept with probability p each step) or
TRAINED, as a scalar for a whole leaf or a uint8 array per entry. The chosen share is over
the backbone (every parameter outside the head); the head trains whole unless
`train_head=False`. `ftlab.plans.policies` combines these with the leaf-level policies.

Dynamic masks (`reselect`, `rigl`) choose their first mask here, over a *scope* (the
backbone, or the given blocks) at an exact count `round(density * scope size)`, and
describe how it changes in a `DynamicMask`; `ftlab.plans.dynamic_masks` changes it in training.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from ftlab.plans.syntax import PlanError

# Entry levels of a trainable set, ordered so that union is max and intersection is min.
FROZEN, RESAMPLED, TRAINED = 0, 1, 2

DYNAMIC_POLICIES = ('reselect', 'rigl')  # masks that change during training


@dataclasses.dataclass(frozen=True)
class DynamicMask:
  """How a per-element mask changes during training (hashable: a static argument of jit).

  Attributes:
    kind: `reselect` (a new top-`count` mask by `score`) or `rigl` (drop and grow).
    every: steps between changes: the mask changes before step `every * i + 1`, i >= 1.
    scope: the leaves whose entries the mask chooses among, in sorted path order.
    count: the entries chosen at every step (`round(density * scope size)`).
    score: `fisher` or `magnitude` (reselect), `gradient` (rigl's growth criterion).
    which: magnitude's `largest` or `smallest`.
    num_batches: batches of the Fisher or gradient estimate (None: every training example).
    fraction: rigl's share of the `count` entries dropped and grown at each change.
  """

  kind: str
  every: int
  scope: tuple[str, ...]
  count: int
  score: str
  which: str = 'largest'
  num_batches: int | None = None
  fraction: float = 0.0


def _get(cfg: Any, key: str, default: Any) -> Any:
  value = cfg.get(key, default)
  return default if value is None else value


def _backbone_and_head(paths, structure, cfg) -> tuple[list[str], set[str]]:
  head = {p for p in paths if p.split('/')[0] in structure.head.layers}
  return [p for p in paths if p not in head], head if _get(cfg, 'train_head', True) else set()


def _check_fraction(cfg: Any, key: str) -> float:
  value = _get(cfg, key, None)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
    raise PlanError(f'policy {cfg.name}: {key}={value!r} is not a fraction in (0, 1]')
  return float(value)


def top_fraction(scores: Mapping[str, np.ndarray], density: float) -> dict[str, np.ndarray]:
  """Boolean masks choosing exactly round(density * n) entries with the largest scores,
  over all the given leaves together."""
  flat = np.concatenate([np.asarray(s, np.float64).ravel() for s in scores.values()])
  k = int(round(density * flat.size))
  chosen = np.zeros(flat.size, bool)
  if k:
    chosen[np.argpartition(-flat, k - 1)[:k]] = True
  out, offset = {}, 0
  for path, s in scores.items():
    out[path] = chosen[offset : offset + s.size].reshape(s.shape)
    offset += s.size
  return out


def _element_policy(score_fn: Callable) -> Callable:
  """A per-element policy from a scoring rule: the top `density` of the backbone's entries
  by score, plus the whole head (unless train_head=False)."""

  def policy(paths, structure, cfg, ctx):
    density = _check_fraction(cfg, 'p' if 'p' in dict(cfg.args) else 'density')
    _check_element_args(cfg)
    backbone, head = _backbone_and_head(paths, structure, cfg)
    levels = {p: TRAINED if p in head else FROZEN for p in paths}
    if ctx.params is None:  # shapes only: any backbone entry may be chosen
      ctx.pending = True
      return {**levels, **{p: TRAINED for p in backbone}}
    scores = score_fn(backbone, cfg, ctx)
    chosen = top_fraction({p: scores[p] for p in backbone}, density)
    return {**levels, **{p: (chosen[p] * TRAINED).astype(np.uint8) for p in backbone}}

  return policy


def _check_element_args(cfg: Any) -> None:
  """The arguments besides the density, checked before any weights or data are read."""
  which, seed = _get(cfg, 'which', 'largest'), _get(cfg, 'seed', 0)
  num_batches = _get(cfg, 'num_batches', None)
  if which not in ('largest', 'smallest'):
    raise PlanError(f"policy magnitude: which={which!r} is not 'largest' or 'smallest'")
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise PlanError(f'policy {cfg.name}: seed={seed!r} is not an int')
  if num_batches is not None and (
    isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
  ):
    raise PlanError(f'policy {cfg.name}: num_batches={num_batches!r} is not a positive int')


def _random_scores(paths, cfg, ctx):
  rng = np.random.default_rng(int(_get(cfg, 'seed', 0)))
  return {p: rng.random(ctx.params[p].shape, np.float32) for p in paths}


def _magnitude_scores(paths, cfg, ctx):
  sign = 1.0 if _get(cfg, 'which', 'largest') == 'largest' else -1.0
  return {p: sign * np.abs(np.asarray(ctx.params[p], np.float32)) for p in paths}


def _fisher_scores(paths, cfg, ctx):
  if ctx.fisher_fn is None:
    raise PlanError(f'policy {cfg.name} needs gradients of the training data (fisher_fn)')
  scores = ctx.fisher_fn(_get(cfg, 'num_batches', None))
  return {p: np.asarray(scores[p]) for p in paths}


def child_tuning_f(paths, structure, cfg, ctx):
  """Every backbone entry is RESAMPLED: a fresh Bernoulli(p) mask each step, scaled by 1/p."""
  ctx.resample_p = _check_fraction(cfg, 'p')
  backbone, head = _backbone_and_head(paths, structure, cfg)
  return {p: TRAINED if p in head else RESAMPLED if p in backbone else FROZEN for p in paths}


def _positive_int(name: str, key: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise PlanError(f'policy {name}: {key}={value!r} is not a positive int')
  return value


def _scope(paths, structure, cfg) -> tuple[list[str], set[str]]:
  """The backbone leaves a dynamic mask chooses among (those of `blocks`, if given), and
  the head leaves that train whole."""
  backbone, head = _backbone_and_head(paths, structure, cfg)
  requested = _get(cfg, 'blocks', None)
  if requested is None:
    return backbone, head
  by_name = {b.name: b for b in structure.blocks}
  names = [f'block{b}' if isinstance(b, int) else str(b) for b in list(requested)]
  unknown = [n for n in names if n not in by_name]
  if not names or unknown:
    raise PlanError(f'policy {cfg.name}: blocks={requested!r}; valid: {list(by_name)}')
  layers = {layer for n in names for layer in by_name[n].layers}
  return [p for p in backbone if p.split('/')[0] in layers], head


def top_count(scores: Mapping[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
  """Boolean masks choosing exactly `count` entries with the largest scores over all the
  leaves together (in the mapping's order); ties go to the lower flat index, NaN ranks last.
  The numpy twin of `ftlab.plans.dynamic_masks.top_count` (the tests hold them equal)."""
  flat = np.concatenate([np.asarray(s, np.float32).ravel() for s in scores.values()])
  flat = np.where(np.isnan(flat), -np.inf, flat)
  chosen = np.zeros(flat.size, bool)
  chosen[np.argsort(-flat, kind='stable')[:count]] = True
  out, offset = {}, 0
  for path, s in scores.items():
    out[path] = chosen[offset : offset + np.size(s)].reshape(np.shape(s))
    offset += np.size(s)
  return out


def _dynamic_policy(paths, structure, cfg, ctx):
  """`reselect(policy, every)`: the inner policy's top entries, chosen again every `every`
  steps on the current weights; `rigl(density, every, fraction)`: a random first mask, then
  RigL's drop-and-grow (Evci et al., ICML 2020, "Rigging the Lottery")."""
  every = _positive_int(cfg.name, 'every', cfg.get('every'))
  if cfg.name == 'reselect':
    inner = cfg.get('policy')
    density = _check_fraction(inner, 'density')
    _check_element_args(inner)
    score, which = inner.name, _get(inner, 'which', 'largest')
    num_batches, fraction = inner.get('num_batches'), 0.0
  else:
    density = _check_fraction(cfg, 'density')
    fraction = _check_fraction(cfg, 'fraction')
    num_batches = _positive_int('rigl', 'num_batches', _get(cfg, 'num_batches', 1))
    _check_element_args(cfg)
    score, which = 'gradient', 'largest'
  if density >= 1:
    raise PlanError(f'policy {cfg.name}: density={density!r} leaves nothing to change; use < 1')
  scope, head = _scope(paths, structure, cfg)
  levels = {p: TRAINED if p in head else FROZEN for p in paths}
  if ctx.params is None:  # shapes only: sizes unknown to the count, every scope entry may train
    ctx.pending = True
    return {**levels, **{p: TRAINED for p in scope}}
  count = int(round(density * sum(np.size(ctx.params[p]) for p in scope)))
  ctx.dynamic = DynamicMask(cfg.name, every, tuple(sorted(scope)), count, score, which,
                            num_batches, fraction)  # fmt: skip
  if score == 'fisher':
    scores = _fisher_scores(scope, inner, ctx)
  elif score == 'magnitude':
    scores = _magnitude_scores(scope, inner, ctx)
  else:  # RigL starts from a random mask (uniform over the scope here, not its ERK)
    scores = _random_scores(scope, cfg, ctx)
  chosen = top_count({p: scores[p] for p in ctx.dynamic.scope}, count)
  return {**levels, **{p: (chosen[p] * TRAINED).astype(np.uint8) for p in scope}}


ELEMENT_POLICIES = {
  'random_sparse': _element_policy(_random_scores),
  'magnitude': _element_policy(_magnitude_scores),
  'fisher': _element_policy(_fisher_scores),
  # Child-Tuning_D: a fixed child network of the top-p entries by Fisher information.
  'child_tuning_d': _element_policy(_fisher_scores),
  'child_tuning_f': child_tuning_f,
  **dict.fromkeys(DYNAMIC_POLICIES, _dynamic_policy),
}
# Per-element policies that read training gradients (and so need `fisher_fn`).
NEEDS_GRADIENTS = ('fisher', 'child_tuning_d')


def needs_gradients(call: Any) -> bool:
  """Whether a set term reads training gradients to choose its (first) mask."""
  inner = call.get('policy') if call.name == 'reselect' else call
  return inner.name in NEEDS_GRADIENTS
