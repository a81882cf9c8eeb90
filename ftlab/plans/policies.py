"""Fine-tuning policies: which parameters may change, and how fast.

A policy turns `(params, block structure, policy config)` into a `Plan`: a boolean
trainable mask per parameter leaf, per-entry levels for leaves that train only some
entries (sparse masks), an lr multiplier per leaf and the L2-SP regulariser. Parameter
names are read here, once; the optimizer and the step only see the resulting data.
`config.policy.name` is a plan expression (`ftlab.plans.syntax`): policies combined by
union, intersection and difference, modifiers, and multi-stage schedules (`plan_stages`).

Parameters are named by their path joined with '/', e.g. `block1_conv1/kernel`,
`block1_conv1_bn/scale`, `predictions/bias`. Regexes match a whole path
(`re.fullmatch`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np

from ftlab.models.vgg import BlockStructure
from ftlab.paths import doubled, flatten, match_rules, unflatten
from ftlab.plans import sparse_masks, syntax
from ftlab.plans.methods import lora
from ftlab.plans.syntax import PlanError

PyTree = Any
PolicyFn = Callable[[list[str], BlockStructure, Any], set[str]]


FROZEN, RESAMPLED, TRAINED = sparse_masks.FROZEN, sparse_masks.RESAMPLED, sparse_masks.TRAINED


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a fine-tuning run (or one stage of it) may change.

  Attributes:
    name: the plan expression with every argument, e.g. `last_blocks(k=2)`; a stage of a
      schedule adds `[stage i/n: ...]`. Checkpoints record it to tell stages apart.
    trainable_mask: pytree of Python bools: leaves with at least one trainable entry.
    lr_multipliers: pytree of floats (0.0 for frozen leaves) with the same structure.
    frozen_layers: top-level layers all of whose parameters are frozen; their BatchNorm
      layers (if any) run on running statistics during training.
    element_levels: for trainable leaves that train only some entries, a uint8 array of
      entry levels (FROZEN, RESAMPLED, TRAINED) by path; empty for leaf-level plans.
    resample_p: Child-Tuning_F's keep probability for RESAMPLED entries (None if none).
    l2_sp: `{path: (coefficient, toward_anchor)}` for L2-SP: pretrained leaves are pulled
      toward their loaded values, the new head toward zero; None without L2-SP.
    masks_pending: the plan was made from shapes, so per-element masks are not chosen
      yet (the leaf mask then marks every leaf a per-element policy might train).
    dynamic: how the per-element mask changes during training (`reselect`, `rigl`), or
      None for a mask fixed at step 0. Every leaf of its scope is trainable, with entry
      levels, even one none of whose entries the first mask chooses.
  """

  name: str
  trainable_mask: PyTree
  lr_multipliers: PyTree
  frozen_layers: tuple[str, ...]
  element_levels: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
  resample_p: float | None = None
  l2_sp: Mapping[str, tuple[float, bool]] | None = None
  masks_pending: bool = False
  dynamic: sparse_masks.DynamicMask | None = None

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

  def label(self, inner: str) -> str:
    if not self.schedule:
      return inner
    return f'{self.schedule} [stage {self.index + 1}/{self.count}: {inner}]'


# --- The policies. Each returns the set of trainable paths. ---------------------------------


def _layers_of(blocks: Iterable, paths: list[str]) -> set[str]:
  layers = {layer for block in blocks for layer in block.layers}
  return {p for p in paths if p.split('/')[0] in layers}


def _with_head(blocks: list, structure: BlockStructure, cfg: Any) -> list:
  return blocks + [structure.head] if _get(cfg, 'train_head', True) else blocks


def _check_k(k: Any, structure: BlockStructure, name: str) -> int:
  n = len(structure.blocks)
  if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n:
    raise PlanError(f'policy {name}: k={k!r} is not a block count in 1..{n}')
  return k


def full(paths, structure, cfg):
  del structure, cfg
  return set(paths)


def linear_probe(paths, structure, cfg):
  del cfg
  return _layers_of([structure.head], paths)


def last_blocks(paths, structure, cfg):
  k = _check_k(_get(cfg, 'k', None), structure, 'last_blocks')
  return _layers_of(_with_head(list(structure.blocks[-k:]), structure, cfg), paths)


def first_blocks(paths, structure, cfg):
  k = _check_k(_get(cfg, 'k', None), structure, 'first_blocks')
  return _layers_of(_with_head(list(structure.blocks[:k]), structure, cfg), paths)


def blocks(paths, structure, cfg):
  """Any set of blocks by name (`block1`, `fc`) or 1-based conv block number."""
  by_name = {b.name: b for b in structure.blocks}
  chosen = []
  requested = list(_get(cfg, 'blocks', ()))
  if not requested:
    raise PlanError(f'policy blocks: blocks=[] names no block; valid: {list(by_name)}')
  for b in requested:
    name = f'block{b}' if isinstance(b, int) else str(b)
    if name not in by_name:
      raise PlanError(f'policy blocks: block {b!r} does not exist; valid: {list(by_name)}')
    chosen.append(by_name[name])
  return _layers_of(_with_head(chosen, structure, cfg), paths)


def bitfit(paths, structure, cfg):
  """Every bias (conv, dense and BatchNorm shift) plus the new head."""
  biases = {p for p in paths if p.endswith('/bias')}
  head = _layers_of([structure.head], paths) if _get(cfg, 'train_head', True) else set()
  return biases | head


def regex(paths, structure, cfg):
  """`trainable` and `frozen` regex lists; every path must match exactly one rule."""
  del structure
  rules = [(p, True) for p in _get(cfg, 'trainable', ())]
  rules += [(p, False) for p in _get(cfg, 'frozen', ())]
  matches = match_rules(paths, [p for p, _ in rules], 'policy regex', error=PlanError)
  uncovered = [p for p in paths if not matches[p]]
  twice = [f'{p} ({", ".join(rules[i][0] for i in matches[p])})' for p in doubled(matches)]
  if uncovered or twice:
    raise PlanError(
      'policy regex: every parameter must match exactly one rule; '
      + (f'uncovered: {", ".join(uncovered)}' if uncovered else '')
      + ('; ' if uncovered and twice else '')
      + (f'matched twice: {"; ".join(twice)}' if twice else '')
    )
  return {p for p in paths if rules[matches[p][0]][1]}


LEAF_POLICIES: dict[str, PolicyFn] = {
  'full': full,
  'linear_probe': linear_probe,
  'last_blocks': last_blocks,
  'first_blocks': first_blocks,
  'blocks': blocks,
  'bitfit': bitfit,
  'regex': regex,
  'lora': lora.policy,  # adapters next to frozen kernels (ftlab.plans.methods.lora)
}
POLICIES = {**LEAF_POLICIES, **sparse_masks.ELEMENT_POLICIES}


# --- Rules, config access and the plan. -------------------------------------------------------


def _get(cfg: Any, key: str, default: Any) -> Any:
  if cfg is None:
    return default
  value = cfg.get(key, default) if hasattr(cfg, 'get') else getattr(cfg, key, default)
  return default if value is None else value


def lr_multipliers(paths: list[str], trainable: set[str], cfg: Any) -> dict[str, float]:
  """Per-path lr multipliers from `cfg.lr_multipliers`, a list of (regex, multiplier).

  Trainable paths matched by no rule get 1.0; frozen paths get 0.0. A path matched by
  two rules is an error.
  """
  rules = [(str(p), float(m)) for p, m in _get(cfg, 'lr_multipliers', ())]
  matches = match_rules(paths, [p for p, _ in rules], 'lr_multipliers', error=PlanError)
  twice = doubled(matches)
  if twice:
    raise PlanError(f'lr_multipliers: paths matched by more than one rule: {", ".join(twice)}')
  return {
    p: (rules[matches[p][0]][1] if matches[p] else 1.0) if p in trainable else 0.0 for p in paths
  }


# --- Expressions, modifiers, stages and the plan. ---------------------------------------------


@dataclasses.dataclass
class _Context:
  params: dict[str, Any] | None  # flat parameter values; None when planning from shapes
  fisher_fn: Callable | None
  pending: bool = False
  resample_p: float | None = None
  dynamic: sparse_masks.DynamicMask | None = None


def _evaluate(node: Any, paths: list[str], structure: BlockStructure, ctx: _Context) -> dict:
  """{path: level} for a set expression: a scalar level per leaf or a uint8 array per entry."""
  if isinstance(node, syntax.SetOp):
    left = _evaluate(node.left, paths, structure, ctx)
    right = _evaluate(node.right, paths, structure, ctx)
    combine = {
      '|': np.maximum,
      '&': np.minimum,
      '-': lambda a, b: np.where(np.asarray(b) == FROZEN, a, FROZEN),
    }[node.op]
    return {p: combine(left[p], right[p]) for p in paths}
  if node.name in LEAF_POLICIES:
    trainable = LEAF_POLICIES[node.name](paths, structure, node)
    return {p: TRAINED if p in trainable else FROZEN for p in paths}
  return sparse_masks.ELEMENT_POLICIES[node.name](paths, structure, node, ctx)


def _normalise(level: Any) -> Any:
  """A level array whose entries are all equal becomes that scalar level."""
  level = np.asarray(level, np.uint8)
  if level.ndim == 0 or (level == level.flat[0]).all():
    return int(level.flat[0])
  return level


def check_policy_name(name: Any, config: Any = None) -> syntax.Expression:
  """Parses `name` as a plan expression; raises a one-line PlanError if it is not one."""
  return syntax.parse(name, config)


def plan_stages(structure: BlockStructure, cfg: Any, total_steps: int | None = None) -> list[Stage]:
  """The stages of the plan `cfg.name` describes: one for a plain plan, several for a schedule.

  `lp_ft(probe_steps=N, probe_lr_multiplier=m)`: a linear probe for N steps with learning rates
  times m (default 1: a probe often wants a larger rate than fine-tuning everything, and one
  run has one schedule), then everything. `gradual_unfreezing(
  stage_steps=S)`: the head for S steps, then one more block from the top every S steps.
  Stages past `total_steps` are dropped; the last one runs to the end.
  """
  expression = check_policy_name(_get(cfg, 'name', None), cfg)
  schedule, mods = expression.schedule, expression.modifiers
  if schedule is None:
    return [Stage(0, 1, 0, None, expression)]
  steps_arg = 'probe_steps' if schedule.name == 'lp_ft' else 'stage_steps'
  n = schedule.get(steps_arg)
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise PlanError(f'{schedule.name}: {steps_arg}={n!r} is not a positive number of steps')
  scales = [1.0]
  if schedule.name == 'lp_ft':
    # The second stage: everything, or the LoRA set written after the schedule.
    sets = [syntax.Call('linear_probe'), expression.selection or syntax.Call('full')]
    m = schedule.get('probe_lr_multiplier', 1.0)
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m < float('inf'):
      raise PlanError(f'lp_ft: probe_lr_multiplier={m!r} is not a positive number')
    scales = [float(m), 1.0]
  else:
    sets = [syntax.Call('linear_probe')] + [
      syntax.Call('last_blocks', (('k', k),)) for k in range(1, len(structure.blocks) + 1)
    ]
  starts = [i * n for i in range(len(sets))]
  if total_steps is not None:
    if schedule.name == 'lp_ft' and n >= total_steps:
      raise PlanError(f'lp_ft: probe_steps={n} leaves no fine-tuning in {total_steps} steps')
    sets = sets[: max(1, sum(s < total_steps for s in starts))]
  count = len(sets)
  return [
    Stage(
      i,
      count,
      starts[i],
      starts[i + 1] if i + 1 < count else None,
      syntax.Expression(sets[i], None, mods),
      str(schedule),
      scales[i] if i < len(scales) else 1.0,
    )
    for i in range(count)
  ]


def stage_at(stages: list[Stage], steps_done: int) -> Stage:
  """The stage that takes step `steps_done + 1`."""
  return [s for s in stages if s.start <= steps_done][-1]


def _shaped_lr(
  paths: list[str], structure: BlockStructure, mods: dict[str, syntax.Call]
) -> dict[str, float]:
  """Layer-wise lr decay (`decay^(L-1-l)` over blocks l = 0..L-1, head last) or
  discriminative lr (divided by `factor` per layer going down); 1.0 without either."""
  if 'layerwise_lr_decay' in mods:
    units = [set(b.layers) for b in structure.all_blocks]
    rate = mods['layerwise_lr_decay'].get('decay')
    what = 'layerwise_lr_decay: decay'
  elif 'discriminative_lr' in mods:
    # A layer is a conv or dense layer together with its BatchNorm.
    layers = [l for b in structure.all_blocks for l in b.layers if not l.endswith('_bn')]
    units = [{l, f'{l}_bn'} for l in layers]
    factor = mods['discriminative_lr'].get('factor')
    rate = 1.0 / factor if isinstance(factor, (int, float)) and factor > 0 else factor
    what = 'discriminative_lr: factor'
  else:
    return {p: 1.0 for p in paths}
  if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
    value = rate if 'layerwise' in what else factor
    raise PlanError(f'{what}={value!r} is out of range (decay in (0, 1], factor >= 1)')
  depth = {layer: i for i, unit in enumerate(units) for layer in unit}
  top = len(units) - 1
  return {p: float(rate ** (top - depth.get(p.split('/')[0], top))) for p in paths}


def _l2_sp(
  paths: list[str], structure: BlockStructure, trainable: set[str], mods: tuple
) -> dict[str, tuple[float, bool]] | None:
  call = next((m for m in mods if m.name == 'l2_sp'), None)
  if call is None:
    return None
  alpha, beta = call.get('alpha', 0.0), call.get('beta', 0.0)
  for key, value in (('alpha', alpha), ('beta', beta)):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
      raise PlanError(f'l2_sp: {key}={value!r} is not a non-negative number')
  head = _layers_of([structure.head], paths)
  return {
    p: (float(beta), False) if p in head else (float(alpha), True) for p in paths if p in trainable
  }


def make_plan(
  params: PyTree,
  structure: BlockStructure,
  cfg: Any,
  *,
  stage: Stage | None = None,
  fisher_fn: Callable[[int | None], Mapping[str, np.ndarray]] | None = None,
) -> Plan:
  """Builds the plan that policy config `cfg` (with `cfg.name`) describes for `params`.

  Args:
    params: the model's parameters; shapes (`jax.eval_shape`) are enough to check a plan,
      values are needed to choose per-element masks (the plan is then `masks_pending`).
    structure: the model's block structure (`model.block_structure()`).
    cfg: the policy section of the config: `name` (a plan expression, see
      `ftlab.plans.syntax`), the fields bare names read (`k`, `blocks`, `train_head`,
      `trainable`, `frozen`) and `lr_multipliers`.
    stage: the stage of a schedule to plan (default: the first).
    fisher_fn: `num_batches -> {path: mean squared gradient}` for fisher and child_tuning_d.

  Returns:
    The plan.

  Raises:
    PlanError: unknown policy, bad arguments, or a plan that trains nothing.
  """
  stage = stage or plan_stages(structure, cfg)[0]
  flat = flatten(params)
  paths = list(flat)
  has_values = all(isinstance(x, (np.ndarray, np.generic, jax.Array)) for x in flat.values())
  ctx = _Context(flat if has_values else None, fisher_fn)
  levels = {
    p: _normalise(v)
    for p, v in _evaluate(stage.expression.selection, paths, structure, ctx).items()
  }
  label = stage.label(str(stage.expression))
  trainable = {p for p, v in levels.items() if np.any(np.asarray(v) > FROZEN)}
  # A dynamic mask may later choose entries of any leaf of its scope.
  scope = set(ctx.dynamic.scope) if ctx.dynamic else set()
  trainable |= scope
  if not trainable:
    raise PlanError(f'plan {label} trains no parameter; choose a policy that trains something')
  shape = _shaped_lr(paths, structure, {m.name: m for m in stage.expression.modifiers})
  mults = {
    p: m * shape[p] * stage.lr_scale for p, m in lr_multipliers(paths, trainable, cfg).items()
  }
  moving = {p.split('/')[0] for p in trainable}
  frozen_layers = tuple(sorted({p.split('/')[0] for p in paths} - moving))
  element = {
    p: np.full(np.shape(flat[p]), v, np.uint8) if np.ndim(v) == 0 else v
    for p, v in levels.items()
    if p in trainable and (p in scope or not (np.ndim(v) == 0 and v == TRAINED))
  }
  return Plan(
    name=label,
    trainable_mask=unflatten({p: p in trainable for p in paths}),
    lr_multipliers=unflatten(mults),
    frozen_layers=frozen_layers,
    element_levels=element,
    resample_p=ctx.resample_p,
    l2_sp=_l2_sp(paths, structure, trainable, stage.expression.modifiers),
    masks_pending=ctx.pending,
    dynamic=ctx.dynamic,
  )


def needs_gradients(plan_cfg: Any) -> bool:
  """Whether the plan chooses entries by training gradients (fisher, child_tuning_d)."""
  expression = check_policy_name(_get(plan_cfg, 'name', None), plan_cfg)
  return any(sparse_masks.needs_gradients(c) for c in expression.calls())


def _entries(plan: Plan, path: str, size: int) -> int:
  levels = plan.element_levels.get(path)
  return size if levels is None else int(np.count_nonzero(levels))


def trainable_count(plan: Plan, params: PyTree) -> tuple[int, int]:
  """(trainable, total) parameter counts; per-element plans count their chosen entries
  (Child-Tuning_F: every entry that may be sampled), LoRA its adapters; the total is the
  plain model's (adapters are not part of it, so percentages of LoRA and masks compare)."""
  mask = plan.flat_mask()
  sizes = {p: int(np.prod(x.shape)) for p, x in flatten(params).items()}
  total = sum(n for p, n in sizes.items() if not lora.is_adapter(p))
  return sum(_entries(plan, p, n) for p, n in sizes.items() if mask[p]), total


def audit_table(plan: Plan, params: PyTree) -> str:
  """A printable table: path, shape, trainable (or the share of entries), lr multiplier."""
  mask, mults = plan.flat_mask(), flatten(plan.lr_multipliers)

  def trains(p, x):
    if not mask[p]:
      return 'no'
    if p not in plan.element_levels:
      return 'yes'
    levels = plan.element_levels[p]
    if plan.resample_p is not None and (levels == RESAMPLED).any():
      return f'p={plan.resample_p:g}/step'
    return f'{100 * np.count_nonzero(levels) / levels.size:.3g}%'

  rows = [
    (p, str(tuple(x.shape)), trains(p, x), f'{mults[p]:g}' if mask[p] else '-')
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
    how = f'drop and grow {d.fraction:g} of them' if d.kind == 'rigl' else 'chosen again'
    lines.append(
      f'dynamic mask ({d.kind}): {d.count:,} entries of {len(d.scope)} leaves, {how} by '
      f'{d.score} every {d.every} steps; the optimizer moments of entries that enter or '
      'leave the mask are reset to zero'
    )
  if lora.counts(params):
    lines.append(lora.describe(params))
  if plan.l2_sp:
    lines.append('L2-SP: pretrained leaves pulled toward their loaded values, the head toward 0')
  return '\n'.join(lines)


def frozen_checksums(plan: Plan, params: PyTree) -> dict[str, str]:
  """sha256 of every frozen leaf's bytes, by path: proof that frozen parameters did not move."""
  mask = plan.flat_mask()
  return {
    p: hashlib.sha256(np.ascontiguousarray(np.asarray(x)).tobytes()).hexdigest()
    for p, x in flatten(params).items()
    if not mask[p]
  }


def combined_checksum(checksums: Mapping[str, str]) -> str:
  """One sha256 over `path:checksum` lines (sorted), for a summary."""
  lines = ''.join(f'{p}:{c}\n' for p, c in sorted(checksums.items()))
  return hashlib.sha256(lines.encode()).hexdigest()
