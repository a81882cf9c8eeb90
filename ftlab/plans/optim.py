"""The optimizer a plan implies: optax over the trainable set, exact zeros elsewhere.

The parameters are partitioned in two: the frozen group gets `optax.set_to_zero()`
and carries no optimizer state; the trainable group gets the whole chain (clipping,
weight decay, momentum/Adam, the lr schedule, per-leaf lr multipliers), and every
global quantity in that chain (the clipping norm, say) is computed over the trainable
leaves only, so nothing reads a frozen gradient.

Per-element masks (sparse policies) act on the *updates*, last in the chain, so masked
entries stay exactly unchanged under momentum, Adam and weight decay; a modifier's gradient
term (L2-SP's pull toward the loaded weights) comes where weight decay would add one.

The optimizer state is read and changed only through this module: `entry_levels` and
`with_entry_mask` (a dynamic mask's change), `moment_paths` (which leaves carry momentum or
Adam moments), for live states and for states read back from a checkpoint.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftlab import paths
from ftlab.errors import ConfigError
from ftlab.plans import registry
from ftlab.plans.policies import Plan, PlanError
from ftlab.plans.selection import FROZEN, RESAMPLED, TRAINED

OPTIMIZERS = ('sgd', 'adam', 'adamw')
SCHEDULES = ('cosine', 'constant')


def _number(cfg: Any, key: str, default: Any, valid: str, ok) -> float:
  """`cfg.key` as a float, checked by `ok`; a ConfigError naming the field, its value and
  what would be valid otherwise."""
  value = _get(cfg, key, default)
  number = isinstance(value, (int, float)) and not isinstance(value, bool)
  if not number or not math.isfinite(value) or not ok(value):
    raise ConfigError(f'optimizer.{key}={value!r} is not {valid}')
  return float(value)


def check(cfg: Any, total_steps: int) -> list[str]:
  """Checks the optimizer config's values for sense, before anything is built on them.

  Refused (as `torch.optim` refuses them): a negative learning rate, a decay or
  clipping norm below 0, momentum or Adam betas outside [0, 1) (b1 = 1 divides Adam's bias
  correction by zero at every step), eps that is not positive, negative warmup steps.

  Args:
    cfg: the optimizer config.
    total_steps: the run's steps.

  Returns:
    Warnings for values that are legal but surprising, each naming the field: a learning rate
    of 0 (nothing trains; the run evaluates its starting weights, a baseline some studies
    want), a warmup at least as long as the run (the peak learning rate is never reached).

  Raises:
    ConfigError: naming the first bad field, its value and what would be valid.
  """
  name = _get(cfg, 'name', 'sgd')
  if name not in OPTIMIZERS:
    raise ConfigError(f'unknown optimizer {name!r}; valid: {", ".join(OPTIMIZERS)}')
  lr = _number(cfg, 'learning_rate', None, 'a number >= 0 (e.g. 1e-3)', lambda v: v >= 0)
  _number(cfg, 'weight_decay', 0.0, 'a number >= 0 (0: no decay)', lambda v: v >= 0)
  _number(cfg, 'grad_clip_norm', 0.0, 'a number >= 0 (0: no clipping)', lambda v: v >= 0)
  fraction = 'a number in [0, 1)'
  if name == 'sgd':
    _number(cfg, 'momentum', 0.9, f'{fraction} (0: plain SGD)', lambda v: 0 <= v < 1)
  else:
    _number(cfg, 'b1', 0.9, f'{fraction} (e.g. 0.9)', lambda v: 0 <= v < 1)
    _number(cfg, 'b2', 0.999, f'{fraction} (e.g. 0.999)', lambda v: 0 <= v < 1)
    _number(cfg, 'eps', 1e-8, 'a positive number (e.g. 1e-8)', lambda v: v > 0)
  warmup = _get(cfg, 'warmup_steps', 0)
  if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
    raise ConfigError(f'optimizer.warmup_steps={warmup!r} is not a number of steps >= 0')
  schedule = _get(cfg, 'schedule', 'cosine')
  if schedule not in SCHEDULES:
    raise ConfigError(f'unknown schedule {schedule!r}; valid: {", ".join(SCHEDULES)}')
  warnings = []
  if lr == 0:
    warnings.append(
      'optimizer.learning_rate=0: no parameter changes (BatchNorm statistics of trained '
      'layers still do); the run evaluates its starting weights'
    )
  if warmup and warmup >= total_steps:
    reached = lr * total_steps / warmup
    warnings.append(
      f'optimizer.warmup_steps={warmup} >= num_train_steps={total_steps}: the learning rate '
      f'rises to {reached:.3g} at the last step and never reaches its peak {lr:g}'
    )
  return warnings


def _get(cfg: Any, key: str, default: Any) -> Any:
  value = cfg.get(key, default)
  return default if value is None else value


def learning_rate_schedule(cfg: Any, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `cfg.learning_rate` over `cfg.warmup_steps`, then the schedule.

  Args:
    cfg: the optimizer config (`learning_rate`, `warmup_steps`, `schedule`).
    total_steps: training steps; cosine decays to 0 at this step.
  """
  check(cfg, total_steps)
  lr = float(cfg.learning_rate)
  warmup = int(_get(cfg, 'warmup_steps', 0))
  name = _get(cfg, 'schedule', 'cosine')
  if name == 'cosine' and not warmup:
    # optax's warmup-cosine with 0 warmup steps: the same values, without its warning about
    # a zero-step linear schedule.
    # At least one decay step: optax refuses a cosine over 0 steps.
    return optax.cosine_decay_schedule(lr, max(int(total_steps), 1), alpha=0.0)
  if name == 'cosine':
    # optax's `decay_steps` counts the warmup too and must exceed it.
    return optax.warmup_cosine_decay_schedule(
      0.0, lr, warmup, decay_steps=max(int(total_steps), warmup + 1), end_value=0.0
    )
  if not warmup:
    return optax.constant_schedule(lr)
  return optax.join_schedules(
    [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]
  )


def scale_by_multipliers(multipliers: Any) -> optax.GradientTransformation:
  """Multiplies each update leaf by its (static) multiplier."""
  return optax.stateless(
    lambda updates, params=None: jax.tree.map(lambda u, m: u * m, updates, multipliers)
  )


def _by_path(values: Mapping[str, Any], params: Any, default: Any = None) -> Any:
  """A tree like `params` (MaskedNodes kept) holding `values[path]` at each leaf."""
  return jax.tree_util.tree_map_with_path(
    lambda kp, _: values.get(paths.from_key_path(kp), default), params
  )


def decay_multipliers(rules: Any, all_paths: list[str]) -> dict[str, float]:
  """Weight-decay multipliers by parameter path, from `(regex, multiplier)` rules.

  As big_vision's `config.wd_mults`: a path gets the multiplier of the first rule that fully
  matches it, and a path no rule matches is not decayed (e.g. `(('.*/kernel', 1.0),)`: no
  decay on biases and BatchNorm). No rules: every path gets 1. Frozen leaves are never
  decayed, whatever the rules say (`make` decays the trainable group only).

  Args:
    rules: a sequence of `(regex, multiplier)` pairs (`config.optimizer.wd_mults`).
    all_paths: every parameter path.

  Raises:
    PlanError: a rule that is not a (regex, number >= 0) pair, an invalid regex, or a regex
      that matches no parameter.
  """
  if not rules:
    return dict.fromkeys(all_paths, 1.0)
  bad = [r for r in rules if len(r) != 2 or not isinstance(r[1], (int, float)) or r[1] < 0]
  if bad:
    raise PlanError(
      f'optimizer.wd_mults: {bad[0]!r} is not a (regex, multiplier >= 0) pair, '
      "e.g. (('.*/kernel', 1.0),)"
    )
  patterns = [r[0] for r in rules]
  matches = paths.match_rules(all_paths, patterns, 'optimizer.wd_mults', error=PlanError)
  # The first matching rule wins (big_vision's convention), so a specific rule goes before a
  # general one; unlike lr multipliers, overlapping rules are allowed.
  return {p: float(rules[found[0]][1]) if found else 0.0 for p, found in matches.items()}


def add_decayed_weights(
  weight_decay: float, multipliers: Mapping[str, float]
) -> optax.GradientTransformation:
  """Adds `weight_decay * multiplier * w` to each update (leaves with multiplier 0 untouched).

  Args:
    weight_decay: the coefficient (`config.optimizer.weight_decay`).
    multipliers: `{path: multiplier}` from `decay_multipliers`.
  """

  def update(updates, params=None):
    mults = _by_path(multipliers, updates, 0.0)
    # A Python branch on a static multiplier: leaves without decay add nothing to the program.
    return jax.tree.map(
      lambda u, m, w: u + weight_decay * m * w if m else u, updates, mults, params
    )

  return optax.stateless(update)


class EntryMaskState(NamedTuple):
  levels: Any  # uint8 entry levels per element-masked leaf, None elsewhere
  # Raw key data rather than a typed key array: checkpoints and tree maps over the state see
  # a plain uint32 array.
  rng: jnp.ndarray  # uint32[2] key of Child-Tuning_F's per-step Bernoulli masks


def _none(x) -> bool:
  return x is None


def mask_entries(
  levels: Mapping[str, np.ndarray], resample_p: float | None, seed: int
) -> optax.GradientTransformation:
  """Zeroes the updates of masked entries, after everything else in the chain.

  TRAINED entries keep their update; FROZEN entries get -0.0, so `w + update` is `w` bit
  for bit (also for w = -0.0, which `+ 0.0` would flip); RESAMPLED entries keep their
  update divided by p with probability p, drawn afresh every step (Child-Tuning_F). The
  levels and the key live in the state: a resumed run uses the same masks and draws.
  """

  def init(params):
    return EntryMaskState(
      _by_path({p: jnp.asarray(v) for p, v in levels.items()}, params),
      jax.random.key_data(jax.random.key(seed)),
    )

  def update(updates, state, params=None):
    del params
    # The key is carried in the state and split every step: the update needs no step number,
    # and a restored state continues the same sequence of draws.
    rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
    # A counter over leaves in traversal order, which `jax.tree.map` follows, so each leaf
    # folds a distinct number into the step's key and no two leaves share a mask.
    index = iter(range(len(jax.tree.leaves(updates))))

    def leaf(u, level):
      i = next(index)
      if level is None:
        return u
      keep = level == TRAINED
      if resample_p is not None:
        draw = jax.random.bernoulli(jax.random.fold_in(step_rng, i), resample_p, u.shape)
        resampled = (level == RESAMPLED) & draw
        # Divided by p so the expected update equals the unmasked one (inverted-dropout scaling).
        u = jnp.where(resampled, u / resample_p, u)
        keep = keep | resampled
      return jnp.where(keep, u, jnp.asarray(-0.0, u.dtype))

    updates = jax.tree.map(leaf, updates, state.levels, is_leaf=_none)
    return updates, EntryMaskState(state.levels, jax.random.key_data(rng))

  return optax.GradientTransformation(init, update)


def make(
  plan: Plan,
  cfg: Any,
  total_steps: int,
  *,
  first_step: int = 0,
  anchor: Mapping[str, Any] | None = None,
  seed: int = 0,
) -> optax.GradientTransformation:
  """Builds the optax transformation for `plan`.

  Args:
    plan: which leaves (and entries) train, their lr multipliers and regulariser.
    cfg: optimizer config: `name` (sgd | adam | adamw), `learning_rate`, `momentum` (sgd),
      `b1`, `b2`, `eps` (adam/adamw), `weight_decay` (sgd/adam: L2 added to the gradient;
      adamw: decoupled), `wd_mults` (`decay_multipliers`), `grad_clip_norm` (0 = off),
      `warmup_steps`, `schedule`.
    total_steps: length of the run, for the schedule.
    first_step: the run's step at which this optimizer starts (a later stage of a
      schedule): the learning rate follows the run's one schedule across stages.
    anchor: `{path: loaded value}`, the point L2-SP pulls toward (needed with its term).
    seed: the key of Child-Tuning_F's masks.

  Returns:
    A transformation whose state holds nothing for frozen leaves.
  """
  check(cfg, total_steps)
  name = _get(cfg, 'name', 'sgd')
  weight_decay = float(_get(cfg, 'weight_decay', 0.0))
  decay = decay_multipliers(_get(cfg, 'wd_mults', ()), list(paths.flatten(plan.trainable_mask)))
  # The chain's order is its meaning: clipping first, on the raw trainable gradient; then the
  # modifiers' terms and coupled weight decay, so momentum or Adam see them as part of the
  # gradient; AdamW's decoupled decay after Adam; the learning rate; per-leaf multipliers;
  # the entry masks last, so nothing after them can move a masked entry.
  clip = float(_get(cfg, 'grad_clip_norm', 0.0))
  chain = [optax.clip_by_global_norm(clip)] if clip > 0 else []
  for modifier, term in plan.terms.items():  # the modifiers' gradient terms (L2-SP)
    chain.append(registry.get(modifier).transform(term, anchor))
  # Coupled L2 for sgd and adam: added to the gradient before the moments, as
  # `torch.optim.SGD(weight_decay=)` does.
  if weight_decay and name != 'adamw':
    chain.append(add_decayed_weights(weight_decay, decay))
  if name == 'sgd':
    momentum = float(_get(cfg, 'momentum', 0.9))
    if momentum:
      chain.append(optax.trace(decay=momentum, nesterov=bool(_get(cfg, 'nesterov', False))))
  else:
    chain.append(
      optax.scale_by_adam(
        b1=float(_get(cfg, 'b1', 0.9)),
        b2=float(_get(cfg, 'b2', 0.999)),
        eps=float(_get(cfg, 'eps', 1e-8)),
      )
    )
    # Decoupled (Loshchilov & Hutter): after Adam's scaling, still multiplied by the learning
    # rate below, as `optax.adamw` does.
    if weight_decay and name == 'adamw':
      chain.append(add_decayed_weights(weight_decay, decay))
  schedule = learning_rate_schedule(cfg, total_steps)
  if first_step:
    # The default argument binds the run's schedule now; without it the lambda would call
    # itself. optax counts from 0 at each new optimizer, so the offset keeps a later stage on
    # the run's one curve.
    schedule = lambda count, schedule=schedule: schedule(count + first_step)
  chain.append(optax.scale_by_learning_rate(schedule))
  # Inside the partition the trainable group sees frozen leaves as empty MaskedNodes;
  # the multiplier tree is masked the same way so the two trees line up.
  mults = jax.tree.map(
    lambda m, keep: m if keep else optax.MaskedNode(), plan.lr_multipliers, plan.trainable_mask
  )
  # MaskedNodes have no leaves: the frozen leaves' 0.0 multipliers do not count here, and a
  # plan without lr shapes or rules gets no multiplier transformation at all.
  if any(m != 1.0 for m in jax.tree.leaves(mults)):
    chain.append(scale_by_multipliers(mults))
  if plan.element_levels:
    chain.append(mask_entries(plan.element_levels, plan.resample_p, seed))
  labels = jax.tree.map(lambda keep: 'trainable' if keep else 'frozen', plan.trainable_mask)
  # `optax.partition` rather than `optax.masked`: masked leaves would pass their raw gradient
  # through as the update, and the frozen group's `set_to_zero` holds no state.
  return optax.partition({'trainable': optax.chain(*chain), 'frozen': optax.set_to_zero()}, labels)


# --- Reading and changing the state. ------------------------------------------------------------

# The optax states holding per-entry moments, and their fields (reset when a mask changes).
MOMENTS = {optax.ScaleByAdamState: ('mu', 'nu'), optax.TraceState: ('trace',)}


def _visit(opt_state: Any, kinds: tuple, fn) -> Any:
  """`opt_state` with `fn` applied to every node of one of `kinds` (NamedTuple states)."""
  return jax.tree.map(
    lambda node: fn(node) if isinstance(node, kinds) else node,
    opt_state,
    is_leaf=lambda x: isinstance(x, kinds),
  )


def _flat_with_nones(tree: Any) -> dict[str, Any]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_none)
  return {paths.from_key_path(kp): x for kp, x in flat if x is not None}


def entry_levels(opt_state: Any) -> dict[str, Any]:
  """`{param path: uint8 levels}` of the per-element masks an optimizer state holds: the
  entries each partly masked leaf trains (TRAINED), may resample, or keeps (FROZEN).

  Works on the live state (optax's NamedTuples) and on one restored from a checkpoint without
  a target (nested dicts keyed by the same field names).
  """
  found = {}

  def collect(node):
    found.update(_flat_with_nones(node.levels))
    return node

  _visit(opt_state, (EntryMaskState,), collect)
  if not found:  # a restored tree: the EntryMaskState became {'levels': ..., 'rng': ...}
    found = _stored_fields(opt_state, EntryMaskState._fields[0])
  return found


def moment_paths(opt_state: Any) -> set[str]:
  """The parameter paths that carry optimizer moments (Adam's `mu`, SGD momentum's `trace`):
  the leaves an optimizer trains whole or in part. Live or restored states, as
  `entry_levels`."""
  found: set[str] = set()

  def collect(node):
    for field in MOMENTS[type(node)]:
      found.update(_flat_with_nones(getattr(node, field)))
    return node

  _visit(opt_state, tuple(MOMENTS), collect)
  if not found:
    for fields in MOMENTS.values():
      for field in fields:
        found.update(_stored_fields(opt_state, field))
  return found


def _stored_fields(tree: Any, field: str) -> dict[str, Any]:
  """`{param path: leaf}` under every dict key `field` of a restored state (the parameter
  path is what follows the field in the leaf's path)."""
  found = {}
  for path, x in _flat_with_nones(tree).items():
    parts = path.split(paths.SEP)
    if field in parts:
      # The first occurrence of the field name: optax's state nesting (partition, chain, masked)
      # comes before it, the parameter path after.
      found[paths.join(*parts[parts.index(field) + 1 :])] = x
  return found


def with_entry_mask(opt_state: Any, mask: Mapping[str, jnp.ndarray]) -> Any:
  """The optimizer state training `mask`'s entries (`{path: bool array}` of partly masked
  leaves), with the moments (`MOMENTS`) of every entry whose membership changed set to
  zero; traceable (`ftlab.plans.dynamic_masks.remask`)."""
  old = entry_levels(opt_state)
  # Entries that enter or leave the mask get their moments reset (they describe another
  # role); entries that stay keep theirs.
  changed = {p: (old[p] == TRAINED) != m for p, m in mask.items()}

  def by_path(tree, fn):
    def leaf(kp, x):
      p = paths.from_key_path(kp)
      return fn(p, x) if p in mask and x is not None else x

    return jax.tree_util.tree_map_with_path(leaf, tree, is_leaf=_none)

  def update(node):
    if isinstance(node, EntryMaskState):
      levels = by_path(
        node.levels, lambda p, x: jnp.where(mask[p], TRAINED, FROZEN).astype(x.dtype)
      )
      return node._replace(levels=levels)
    reset = lambda p, x: jnp.where(changed[p], jnp.zeros_like(x), x)
    return node._replace(**{f: by_path(getattr(node, f), reset) for f in MOMENTS[type(node)]})

  return _visit(opt_state, (EntryMaskState, *MOMENTS), update)
