"""Fine-tuning plans: which parameters may change, and how fast.

A plan expression (`ftlab.plans.syntax`: methods combined by union, intersection and
difference, modifiers, multi-stage schedules) becomes, per stage, a `Plan`: a boolean
trainable mask per parameter leaf, per-entry levels for leaves that train only some entries
(sparse masks), an lr multiplier per leaf and the gradient terms of its modifiers. Parameter
names are read here, once, through the registered methods (`ftlab.plans.registry`); the
optimizer and the step only see the resulting data.

Parameters are named by their path joined with '/', e.g. `block1_conv1/kernel`,
`block1_conv1_bn/scale`, `predictions/bias`. Regexes match a whole path (`re.fullmatch`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Mapping

import jax
import numpy as np

from ftlab import paths as paths_
from ftlab.models.vgg import BlockStructure
from ftlab.paths import doubled, flatten, match_rules, unflatten
from ftlab.plans import registry, syntax, tuners
from ftlab.plans.registry import PlanError
from ftlab.plans.selection import FROZEN, RESAMPLED, TRAINED, Context, ScoresFn

__all__ = [
  'FROZEN',
  'RESAMPLED',
  'TRAINED',
  'Plan',
  'PlanError',
  'PlanKey',
  'Stage',
  'audit_table',
  'combined_checksum',
  'frozen_checksums',
  'make_plan',
  'plan_stages',
  'stage_at',
  'trainable_count',
]

PyTree = Any


@dataclasses.dataclass(frozen=True)
class PlanKey:
  """What identifies a stage's plan, as data: resume compares it, caches and FLOP records are
  keyed by it (never by the display name).

  Attributes:
    schedule: the schedule's call (`lp_ft(probe_steps=100)`), '' for a one-stage plan.
    stage: the stage's index.
    expression: the stage's expression in canonical form (`Expression.canonical`: every
      argument of every method given, defaults filled in, by name).
  """

  schedule: str
  stage: int
  expression: str

  # Stored in checkpoint meta as plain JSON, so a checkpoint is read without this class.
  def as_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, found: Mapping[str, Any] | None) -> PlanKey | None:
    # None for checkpoints written before plan keys existed; the caller then compares names.
    return cls(**found) if found else None


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a fine-tuning run (or one stage of it) may change.

  Attributes:
    name: the plan expression with every argument, e.g. `last_blocks(k=2)`; a stage of a
      schedule adds `[stage i/n: ...]`. For display and records.
    key: its identity (`PlanKey`).
    trainable_mask: pytree of Python bools: leaves with at least one trainable entry.
    lr_multipliers: pytree of floats (0.0 for frozen leaves) with the same structure.
    frozen_layers: top-level layers all of whose parameters are frozen; their BatchNorm
      layers (if any) run on running statistics during training.
    element_levels: for trainable leaves that train only some entries, a uint8 array of
      entry levels (FROZEN, RESAMPLED, TRAINED) by path; empty for leaf-level plans.
    resample_p: Child-Tuning_F's keep probability for RESAMPLED entries (None if none).
    terms: the gradient terms of the plan's modifiers, by modifier name (L2-SP's
      `{path: (coefficient, toward_anchor)}`); `ftlab.plans.optim` adds each to the chain.
    masks_pending: the plan was made from shapes, so per-element masks are not chosen
      yet (the leaf mask then marks every leaf a per-element policy might train).
    dynamic: how the per-element mask changes during training
      (`ftlab.plans.dynamic_masks.DynamicMask`), or None for a mask fixed at step 0. Every
      leaf of its scope is trainable, with entry levels, even one none of whose entries the
      first mask chooses.
  """

  name: str
  key: PlanKey
  trainable_mask: PyTree
  lr_multipliers: PyTree
  frozen_layers: tuple[str, ...]
  element_levels: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
  resample_p: float | None = None
  terms: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  masks_pending: bool = False
  dynamic: Any = None

  def flat_mask(self) -> dict[str, bool]:
    return flatten(self.trainable_mask)


@dataclasses.dataclass(frozen=True)
class Stage:
  """A part of a run under one plan: steps `start + 1 .. end` (end None: to the run's end)."""

  index: int
  count: int
  start: int
  end: int | None
  expression: syntax.Expression
  schedule: str = ''
  lr_scale: float = 1.0  # multiplies every lr multiplier of the stage (lp_ft's probe)
  schedule_key: str = ''  # the schedule's call in canonical form (every argument given)

  def label(self, inner: str) -> str:
    if not self.schedule:
      return inner
    return f'{self.schedule} [stage {self.index + 1}/{self.count}: {inner}]'

  @property
  def name(self) -> str:
    """The stage's plan name (`Plan.name`)."""
    return self.label(str(self.expression))

  @property
  def key(self) -> PlanKey:
    """The stage's plan identity (`Plan.key`)."""
    return PlanKey(self.schedule_key, self.index, self.expression.canonical())


def _get(cfg: Any, key: str, default: Any) -> Any:
  if cfg is None:
    return default
  # A ConfigDict, a plain dict or any object with attributes: tests and scripts build policy
  # sections by hand.
  value = cfg.get(key, default) if hasattr(cfg, 'get') else getattr(cfg, key, default)
  return default if value is None else value


def lr_multipliers(paths: list[str], trainable: set[str], cfg: Any) -> dict[str, float]:
  """Per-path lr multipliers from `cfg.lr_multipliers`, a list of (regex, multiplier).

  Trainable paths matched by no rule get 1.0; frozen paths get 0.0. A path matched by
  two rules is an error.
  """
  rules = [(str(p), float(m)) for p, m in _get(cfg, 'lr_multipliers', ())]
  matches = match_rules(paths, [p for p, _ in rules], 'lr_multipliers', error=PlanError)
  # Two rules on one path would make the multiplier depend on rule order; refused instead.
  twice = doubled(matches)
  if twice:
    raise PlanError(f'lr_multipliers: paths matched by more than one rule: {", ".join(twice)}')
  return {
    p: (rules[matches[p][0]][1] if matches[p] else 1.0) if p in trainable else 0.0 for p in paths
  }


# --- Expressions, stages and the plan. --------------------------------------------------------


def _evaluate(node: Any, ctx: Context) -> dict:
  """{path: level} for a set expression: a scalar level per leaf or a uint8 array per entry."""
  if isinstance(node, syntax.SetOp):
    left, right = _evaluate(node.left, ctx), _evaluate(node.right, ctx)
    combine = {
      '|': np.maximum,
      '&': np.minimum,
      # Difference keeps an entry of `a` only where `b` leaves it frozen: subtracting a set that
      # trains or resamples an entry freezes it, whatever level `a` gave it.
      '-': lambda a, b: np.where(np.asarray(b) == FROZEN, a, FROZEN),
    }[node.op]
    return {p: combine(left[p], right[p]) for p in ctx.paths}
  return registry.get(node.name).select(node, ctx)


def _normalise(level: Any) -> Any:
  """A level array whose entries are all equal becomes that scalar level."""
  level = np.asarray(level, np.uint8)
  # A per-element result that turned out uniform (a whole leaf chosen or none of it) becomes a
  # plain leaf-level decision: no entry mask, no masking work in the optimizer.
  if level.ndim == 0 or (level == level.flat[0]).all():
    return int(level.flat[0])
  return level


def check_policy_name(name: Any, config: Any = None) -> syntax.Expression:
  """Parses `name` as a plan expression; raises a one-line PlanError if it is not one."""
  return syntax.parse(name, config)


def plan_stages(
  structure: BlockStructure,
  cfg: Any,
  total_steps: int | None = None,
  expression: syntax.Expression | None = None,
) -> list[Stage]:
  """The stages of the plan `cfg.name` describes: one for a plain plan, several for a schedule
  (the schedule's method says which sets and how long). Stages past `total_steps` are
  dropped; the last one runs to the end. The expression is parsed here (once for the run),
  unless given already parsed.

  Raises:
    PlanError: a bad expression, or schedule arguments out of range.
  """
  if expression is None:
    expression = check_policy_name(_get(cfg, 'name', None), cfg)
  schedule, mods = expression.schedule, expression.modifiers
  if schedule is None:
    return [Stage(0, 1, 0, None, expression)]
  specs = registry.get(schedule.name).stages(schedule, expression.selection, structure, total_steps)
  starts = [0]
  for spec in specs[:-1]:
    starts.append(starts[-1] + spec.steps)
  if total_steps is not None:
    # Stages that would start at or after the run's end are dropped; the first always stays.
    specs = specs[: max(1, sum(s < total_steps for s in starts))]
  count = len(specs)
  return [
    Stage(
      i,
      count,
      starts[i],
      starts[i + 1] if i + 1 < count else None,
      syntax.Expression(spec.selection, None, mods),
      str(schedule),
      spec.lr_scale,
      str(syntax.complete(schedule)),
    )
    for i, spec in enumerate(specs)
  ]


def stage_at(stages: list[Stage], steps_done: int) -> Stage:
  """The stage that takes step `steps_done + 1`."""
  # Stages are in start order, so the last one started is the current one.
  return [s for s in stages if s.start <= steps_done][-1]


def make_plan(
  params: PyTree,
  structure: BlockStructure,
  cfg: Any,
  *,
  stage: Stage | None = None,
  scores_fn: ScoresFn | None = None,
) -> Plan:
  """Builds the plan that policy config `cfg` (with `cfg.name`) describes for `params`.

  Args:
    params: the model's parameters; shapes (`jax.eval_shape`) are enough to check a plan,
      values are needed to choose per-element masks (the plan is then `masks_pending`).
    structure: the model's block structure (`model.block_structure()`).
    cfg: the policy section of the config: `name` (a plan expression, see
      `ftlab.plans.syntax`), the fields bare names read (`k`, `blocks`, `train_head`,
      `trainable`, `frozen`) and `lr_multipliers`.
    stage: the stage to plan (`plan_stages`; default: the first, parsing `cfg.name`).
    scores_fn: `(kind, num_batches) -> {path: scores}` for selectors that read the training
      data (`fisher`: mean squared per-example gradient; `gradient`: mean gradient).

  Returns:
    The plan.

  Raises:
    PlanError: unknown policy, bad arguments, or a plan that trains nothing.
  """
  stage = stage or plan_stages(structure, cfg)[0]
  flat = flatten(params)
  paths = list(flat)
  # Shapes (`jax.ShapeDtypeStruct`) plan and check without weights; real arrays let
  # per-element selectors choose their entries now.
  has_values = all(isinstance(x, (np.ndarray, np.generic, jax.Array)) for x in flat.values())
  shapes = {p: tuple(np.shape(x)) for p, x in flat.items()}
  ctx = Context(paths, structure, flat if has_values else None, shapes, scores_fn)
  levels = {p: _normalise(v) for p, v in _evaluate(stage.expression.selection, ctx).items()}
  trainable = {p for p, v in levels.items() if np.any(np.asarray(v) > FROZEN)}
  # A dynamic mask may later choose entries of any leaf of its scope.
  scope = set(ctx.dynamic.scope) if ctx.dynamic else set()
  trainable |= scope
  if not trainable:
    raise PlanError(f'plan {stage.name} trains no parameter; choose a policy that trains something')
  # `shape` collects the modifiers' lr factors by depth; below it multiplies the config's
  # per-path multipliers (0 for frozen leaves) and the stage's factor.
  shape, terms = dict.fromkeys(paths, 1.0), {}
  for call in stage.expression.modifiers:
    modifier = registry.get(call.name)
    scale = modifier.lr_scale(call, paths, structure)
    if scale is not None:
      shape = {p: shape[p] * scale[p] for p in paths}
    term = modifier.term(call, paths, structure, trainable)
    if term is not None:
      terms[call.name] = term
  mults = {
    p: m * shape[p] * stage.lr_scale for p, m in lr_multipliers(paths, trainable, cfg).items()
  }
  # A layer is frozen only if none of its leaves trains: a BatchNorm layer whose shift
  # trains (bitfit) normalises by batch statistics and updates its running ones, as usual.
  moving = {paths_.layer_of(p) for p in trainable}
  frozen_layers = tuple(sorted({paths_.layer_of(p) for p in paths} - moving))
  # Entry levels are kept only where they say something: a dynamic scope always (its mask
  # will move), otherwise leaves that are neither wholly trained nor wholly frozen.
  element = {
    p: np.full(shapes[p], v, np.uint8) if np.ndim(v) == 0 else v
    for p, v in levels.items()
    if p in trainable and (p in scope or not (np.ndim(v) == 0 and v == TRAINED))
  }
  return Plan(
    name=stage.name,
    key=stage.key,
    trainable_mask=unflatten({p: p in trainable for p in paths}),
    lr_multipliers=unflatten(mults),
    frozen_layers=frozen_layers,
    element_levels=element,
    resample_p=ctx.resample_p,
    terms=terms,
    masks_pending=ctx.pending,
    dynamic=ctx.dynamic,
  )


def scores_needed(stage: Stage) -> set[str]:
  """The score passes (`fisher`, `gradient`) the stage's selectors read to choose masks."""
  return {registry.get(c.name).scores_needed(c) for c in stage.expression.calls()} - {''}


def needs_gradients(plan_cfg: Any) -> bool:
  """Whether the plan chooses entries by training gradients (fisher, child_tuning_d)."""
  expression = check_policy_name(_get(plan_cfg, 'name', None), plan_cfg)
  return bool(scores_needed(Stage(0, 1, 0, None, expression)))


def _entries(plan: Plan, path: str, size: int) -> int:
  levels = plan.element_levels.get(path)
  return size if levels is None else int(np.count_nonzero(levels))


def trainable_count(plan: Plan, params: PyTree) -> tuple[int, int]:
  """(trainable, total) parameter counts; per-element plans count their chosen entries
  (Child-Tuning_F: every entry that may be sampled), tuners their adapters; the total is the
  plain model's (adapters are not part of it, so percentages of tuners and masks compare)."""
  mask = plan.flat_mask()
  sizes = {p: int(np.prod(x.shape)) for p, x in flatten(params).items()}
  total = sum(n for p, n in sizes.items() if not tuners.is_adapter(p))
  return sum(_entries(plan, p, n) for p, n in sizes.items() if mask[p]), total


def audit_table(plan: Plan, params: PyTree) -> str:
  """A printable table: path, shape, trainable (or the share of entries), lr multiplier."""
  mask, mults = plan.flat_mask(), flatten(plan.lr_multipliers)

  def trains(p):
    if not mask[p]:
      return 'no'
    if p not in plan.element_levels:
      return 'yes'
    levels = plan.element_levels[p]
    if plan.resample_p is not None and (levels == RESAMPLED).any():
      return f'p={plan.resample_p:g}/step'
    return f'{100 * np.count_nonzero(levels) / levels.size:.3g}%'

  rows = [
    (p, str(tuple(x.shape)), trains(p), f'{mults[p]:g}' if mask[p] else '-')
    for p, x in flatten(params).items()
  ]
  header = ('path', 'shape', 'trainable', 'lr_mult')
  widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
  fmt = lambda r: '  '.join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
  n_train, n_total = trainable_count(plan, params)
  n_leaves = sum(mask.values())
  lines = [f'plan: {plan.name}', fmt(header), fmt(['-' * w for w in widths])]
  lines += [fmt(r) for r in rows]
  lines.append(
    f'trainable: {n_train:,} of {n_total:,} parameters ({100 * n_train / n_total:.4g}%), '
    f'{n_leaves} of {len(rows)} leaves'
  )
  if plan.element_levels:
    lines.append(
      f'{len(plan.element_levels)} leaves train some entries only: their optimizer state is '
      'dense, their masked entries get exactly zero update'
    )
  if plan.masks_pending:
    lines.append('per-element masks are chosen when the weights are loaded')
  if plan.dynamic:
    d = plan.dynamic
    how = registry.get(d.kind).describe(d)
    lines.append(
      f'dynamic mask ({d.kind}): {d.count:,} entries of {len(d.scope)} leaves, {how} by '
      f'{d.score} every {d.every} steps; the optimizer moments of entries that enter or '
      'leave the mask are reset to zero'
    )
  adapters = tuners.describe(params)
  if adapters:
    lines.append(adapters)
  lines += [registry.get(name).describe(term) for name, term in plan.terms.items()]
  return '\n'.join(line for line in lines if line)


def frozen_checksums(plan: Plan, params: PyTree) -> dict[str, str]:
  """sha256 of every frozen leaf's bytes, by path: proof that frozen parameters did not move."""
  mask = plan.flat_mask()
  return {
    # The bytes of the C-ordered array: identical values give identical hashes whatever the
    # array's layout, and a -0.0 that became 0.0 counts as moved.
    p: hashlib.sha256(np.ascontiguousarray(np.asarray(x)).tobytes()).hexdigest()
    for p, x in flatten(params).items()
    if not mask[p]
  }


def combined_checksum(checksums: Mapping[str, str]) -> str:
  """One sha256 over `path:checksum` lines (sorted), for a summary."""
  lines = ''.join(f'{p}:{c}\n' for p, c in sorted(checksums.items()))
  return hashlib.sha256(lines.encode()).hexdigest()
