"""The optimizer a plan implies: optax over the trainable set, exact zeros elsewhere.

The parameters are partitioned in two: the frozen group gets `optax.set_to_zero()`
and carries no optimizer state; the trainable group gets the whole chain (clipping,
weight decay, momentum/Adam, the lr schedule, per-leaf lr multipliers), and every
global quantity in that chain (the clipping norm, say) is computed over the trainable
leaves only, so nothing reads a frozen gradient.

Per-element masks (sparse policies) act on the *updates*, last in the chain, so masked
entries stay exactly unchanged under momentum, Adam and weight decay; L2-SP adds its
gradient toward the loaded weights where weight decay would add one toward zero.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftlab import paths
from ftlab.plans import policies
from ftlab.plans.policies import Plan, PlanError

OPTIMIZERS = ('sgd', 'adam', 'adamw')
SCHEDULES = ('cosine', 'constant')


def _get(cfg: Any, key: str, default: Any) -> Any:
  value = cfg.get(key, default)
  return default if value is None else value


def learning_rate_schedule(cfg: Any, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `cfg.learning_rate` over `cfg.warmup_steps`, then the schedule.

  Args:
    cfg: the optimizer config (`learning_rate`, `warmup_steps`, `schedule`).
    total_steps: training steps; cosine decays to 0 at this step.
  """
  lr = float(cfg.learning_rate)
  warmup = int(_get(cfg, 'warmup_steps', 0))
  name = _get(cfg, 'schedule', 'cosine')
  if name not in SCHEDULES:
    raise PlanError(f'unknown schedule {name!r}; valid: {", ".join(SCHEDULES)}')
  if name == 'cosine' and not warmup:
    # optax's warmup-cosine with 0 warmup steps: the same values, without its warning about
    # a zero-step linear schedule.
    return optax.cosine_decay_schedule(lr, max(int(total_steps), 1), alpha=0.0)
  if name == 'cosine':
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
    return jax.tree.map(
      lambda u, m, w: u + weight_decay * m * w if m else u, updates, mults, params
    )

  return optax.stateless(update)


class L2SPState(NamedTuple):
  anchor: Any  # the loaded value of each pretrained leaf (None for the head: toward 0)


def add_l2_sp(
  coefficients: Mapping[str, tuple[float, bool]], anchor: Mapping[str, Any]
) -> optax.GradientTransformation:
  """Adds the gradient of `coef/2 ||w - w0||^2` (w0 = `anchor[path]`, or 0 for the head).

  Args:
    coefficients: `{path: (coefficient, toward_anchor)}` (`Plan.l2_sp`).
    anchor: the loaded parameters by path; they are copied into the optimizer state at
      `init`, so a resumed run pulls toward the same point.
  """

  def init(params):
    def leaf(kp, x):
      coef, toward_anchor = coefficients[paths.from_key_path(kp)]
      return (
        jnp.asarray(anchor[paths.from_key_path(kp)], x.dtype) if toward_anchor and coef else None
      )

    return L2SPState(jax.tree_util.tree_map_with_path(leaf, params))

  def update(updates, state, params):
    coefs = _by_path({p: c for p, (c, _) in coefficients.items()}, updates)

    def leaf(u, c, w, w0):
      return u if not c else u + c * (w - w0 if w0 is not None else w)

    updates = jax.tree.map(leaf, updates, coefs, params, state.anchor, is_leaf=_none)
    return updates, state

  return optax.GradientTransformation(init, update)


class EntryMaskState(NamedTuple):
  levels: Any  # uint8 entry levels per element-masked leaf, None elsewhere
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
    rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
    index = iter(range(len(jax.tree.leaves(updates))))

    def leaf(u, level):
      i = next(index)
      if level is None:
        return u
      keep = level == policies.TRAINED
      if resample_p is not None:
        draw = jax.random.bernoulli(jax.random.fold_in(step_rng, i), resample_p, u.shape)
        resampled = (level == policies.RESAMPLED) & draw
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
    anchor: `{path: loaded value}`, the point L2-SP pulls toward (needed with `plan.l2_sp`).
    seed: the key of Child-Tuning_F's masks.

  Returns:
    A transformation whose state holds nothing for frozen leaves.
  """
  name = _get(cfg, 'name', 'sgd')
  if name not in OPTIMIZERS:
    raise PlanError(f'unknown optimizer {name!r}; valid: {", ".join(OPTIMIZERS)}')
  weight_decay = float(_get(cfg, 'weight_decay', 0.0))
  decay = decay_multipliers(_get(cfg, 'wd_mults', ()), list(paths.flatten(plan.trainable_mask)))
  clip = float(_get(cfg, 'grad_clip_norm', 0.0))
  chain = [optax.clip_by_global_norm(clip)] if clip > 0 else []
  if plan.l2_sp:
    if anchor is None:
      raise ValueError('plan uses l2_sp but no anchor (the loaded parameters) was given')
    chain.append(add_l2_sp(plan.l2_sp, anchor))
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
    if weight_decay and name == 'adamw':
      chain.append(add_decayed_weights(weight_decay, decay))
  schedule = learning_rate_schedule(cfg, total_steps)
  if first_step:
    schedule = lambda count, schedule=schedule: schedule(count + first_step)
  chain.append(optax.scale_by_learning_rate(schedule))
  # Inside the partition the trainable group sees frozen leaves as empty MaskedNodes;
  # the multiplier tree is masked the same way so the two trees line up.
  mults = jax.tree.map(
    lambda m, keep: m if keep else optax.MaskedNode(), plan.lr_multipliers, plan.trainable_mask
  )
  if any(m != 1.0 for m in jax.tree.leaves(mults)):
    chain.append(scale_by_multipliers(mults))
  if plan.element_levels:
    chain.append(mask_entries(plan.element_levels, plan.resample_p, seed))
  labels = jax.tree.map(lambda keep: 'trainable' if keep else 'frozen', plan.trainable_mask)
  return optax.partition({'trainable': optax.chain(*chain), 'frozen': optax.set_to_zero()}, labels)
