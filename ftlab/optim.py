"""The optimizer a plan implies: optax over the trainable set, exact zeros elsewhere.

The parameters are partitioned in two: the frozen group gets `optax.set_to_zero()`
and carries no optimizer state; the trainable group gets the whole chain (clipping,
weight decay, momentum/Adam, the lr schedule, per-leaf lr multipliers), and every
global quantity in that chain (the clipping norm, say) is computed over the trainable
leaves only, so nothing reads a frozen gradient.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from ftlab.policies import Plan

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
    raise ValueError(f'unknown schedule {name!r}; valid: {", ".join(SCHEDULES)}')
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


def make(plan: Plan, cfg: Any, total_steps: int) -> optax.GradientTransformation:
  """Builds the optax transformation for `plan`.

  Args:
    plan: which leaves train and their lr multipliers.
    cfg: optimizer config: `name` (sgd | adam | adamw), `learning_rate`, `momentum` (sgd),
      `b1`, `b2`, `eps` (adam/adamw), `weight_decay` (sgd/adam: L2 added to the gradient;
      adamw: decoupled), `grad_clip_norm` (0 = off), `warmup_steps`, `schedule`.
    total_steps: length of the run, for the schedule.

  Returns:
    A transformation whose state holds nothing for frozen leaves.
  """
  name = _get(cfg, 'name', 'sgd')
  if name not in OPTIMIZERS:
    raise ValueError(f'unknown optimizer {name!r}; valid: {", ".join(OPTIMIZERS)}')
  weight_decay = float(_get(cfg, 'weight_decay', 0.0))
  clip = float(_get(cfg, 'grad_clip_norm', 0.0))
  chain = [optax.clip_by_global_norm(clip)] if clip > 0 else []
  if weight_decay and name != 'adamw':
    chain.append(optax.add_decayed_weights(weight_decay))
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
      chain.append(optax.add_decayed_weights(weight_decay))
  chain.append(optax.scale_by_learning_rate(learning_rate_schedule(cfg, total_steps)))
  # Inside the partition the trainable group sees frozen leaves as empty MaskedNodes;
  # the multiplier tree is masked the same way so the two trees line up.
  mults = jax.tree.map(
    lambda m, keep: m if keep else optax.MaskedNode(), plan.lr_multipliers, plan.trainable_mask
  )
  if any(m != 1.0 for m in jax.tree.leaves(mults)):
    chain.append(scale_by_multipliers(mults))
  labels = jax.tree.map(lambda keep: 'trainable' if keep else 'frozen', plan.trainable_mask)
  return optax.partition({'trainable': optax.chain(*chain), 'frozen': optax.set_to_zero()}, labels)
