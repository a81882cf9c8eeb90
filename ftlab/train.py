"""The train state and the per-device steps.

`train_step` and `eval_step` are pure functions written for one device, with every
collective over the axis `'batch'`; `ftlab.parallel` spreads them over devices.
Everything static (the model, the optimizer, the mask) is keyword-only and bound with
`functools.partial` where the step is compiled.

The gradient is taken with respect to the trainable leaves only, so no backward work,
all-reduce or norm ever touches a frozen parameter; frozen leaves pass through the step
as the very same arrays.

Two options of the step: gradient accumulation (`accum_steps` micro-batches per device,
one optimizer update on their mean gradient, activations of one micro-batch at a time) and
an exponential moving average of the weights (`ema_decay`), kept for the entries that can
change only.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from ftlab import ema as ema_
from ftlab import paths
from ftlab.errors import ConfigError
from ftlab.parallel import AXIS, BROADCAST, REPLICATED, SHARDED, in_dispatch_order
from ftlab.plans import policies, tuners

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything a step changes.

  Attributes:
    step: number of steps taken (int32 scalar).
    params: the model parameters.
    batch_stats: BatchNorm running statistics (empty for models without BatchNorm).
    opt_state: optimizer state (nothing for frozen leaves).
    ema: the moving average of the entries that can change (`ftlab.ema.entries`), as a tree like
      `params` holding only those leaves (empty without an EMA).
  """

  step: jnp.ndarray
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  ema: PyTree = flax.struct.field(default_factory=dict)


def create_train_state(
  variables: PyTree,
  tx: optax.GradientTransformation,
  ema: Mapping[str, np.ndarray | None] | None = None,
) -> TrainState:
  """A state at step 0 from model variables (`{'params': ..., 'batch_stats': ...}`), with
  an EMA of the `ema` entries (`ftlab.ema.entries`) starting at their loaded values."""
  params = variables['params']
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get('batch_stats', {}),
    # The frozen group of the plan's optimizer is `set_to_zero`, which keeps no state: moments
    # exist for trainable leaves only, so a frozen network costs no optimizer memory.
    opt_state=tx.init(params),
    ema=ema_.init(params, ema) if ema else {},
  )


def check_step_options(accum_steps: int, ema_decay: float, global_batch: int) -> None:
  """Raises ConfigError, in one line, for an `accum_steps` that does not split each device's
  share of `global_batch` evenly or an `ema_decay` outside [0, 1)."""
  # The global batch splitting over the devices is `parallel.check_divisible`'s check; what
  # matters here is only that each device's share cuts into equal micro-batches.
  per_device = global_batch // jax.device_count()
  if not isinstance(accum_steps, int) or accum_steps < 1 or per_device % accum_steps:
    raise ConfigError(
      f'accum_steps={accum_steps} must divide the {per_device} examples each of the '
      f'{jax.device_count()} devices gets of batch_size {global_batch}'
    )
  # A decay of 1 would keep the starting weights forever; 0 is the off switch, not an average.
  if not 0.0 <= ema_decay < 1.0:
    raise ConfigError(f'ema_decay={ema_decay} is not in [0, 1) (e.g. 0.999; 0 = no EMA)')


def bind_model(model: nn.Module, plan: policies.Plan, axis_name: str | None = AXIS) -> nn.Module:
  """The model as the step runs it: BatchNorm statistics averaged over `axis_name`, and
  the BatchNorm layers of the plan's frozen layers on running statistics."""
  # A frozen layer in train mode would still normalise by batch statistics and overwrite its
  # running ones, so "frozen" BatchNorm would change the function; running statistics keep it
  # the loaded layer (and let `activation_cache` treat a frozen prefix as a pure function).
  return model.clone(axis_name=axis_name, frozen_batch_norm=tuple(plan.frozen_layers))


def cross_entropy(
  logits: jnp.ndarray, labels: jnp.ndarray, label_smoothing: float = 0.0
) -> jnp.ndarray:
  """Per-example softmax cross-entropy against integer labels, optionally smoothed."""
  targets = jax.nn.one_hot(labels, logits.shape[-1])
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def model_variables(params: PyTree, batch_stats: PyTree) -> dict:
  """What `model.apply` takes for a state's `params` and `batch_stats` (none: left out).

  The one place parameters meet `model.apply` in the steps and evaluators: a tuner's adapters
  are folded into their kernels here (a plain tree passes as it is), so the model stays a VGG.
  """
  return {'params': tuners.fold(params), **({'batch_stats': batch_stats} if batch_stats else {})}


def _gradients(
  trainable: dict,
  frozen: dict,
  batch_stats: PyTree,
  batch: dict,
  rng: jax.Array,
  model: nn.Module,
  label_smoothing: float,
  accum_steps: int,
) -> tuple:
  """This device's `(loss, accuracy, batch_stats, gradient of the trainable leaves)`: on the
  whole share, or the mean over `accum_steps` micro-batches taken in turn (`train_step`)."""

  def loss_fn(trainable, batch, batch_stats, rng):
    # The frozen leaves enter as closed-over constants rather than arguments: differentiating
    # with respect to `trainable` alone lets XLA drop their backward work entirely.
    params = paths.merge(frozen, trainable)
    logits, new_vars = model.apply(
      model_variables(params, batch_stats),
      batch['image'],
      train=True,
      mutable=['batch_stats'],
      rngs={'dropout': rng},
    )
    loss = cross_entropy(logits, batch['label'], label_smoothing).mean()
    correct = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
    return loss, (correct, new_vars.get('batch_stats', {}))

  gradients = jax.value_and_grad(loss_fn, has_aux=True)
  if accum_steps == 1:
    (loss, (accuracy, batch_stats)), grads = gradients(trainable, batch, batch_stats, rng)
    return loss, accuracy, batch_stats, grads
  # Contiguous, equal slices of the share (`check_step_options` made the division exact), so
  # the mean of their mean gradients is the share's mean gradient.
  micro = jax.tree.map(lambda x: x.reshape(accum_steps, -1, *x.shape[1:]), batch)

  def micro_step(carry, xs):
    # The statistics ride in the carry: each micro-batch updates them in turn, as successive
    # small steps would, instead of every micro-batch starting from the step's input.
    grads_sum, batch_stats = carry
    micro_batch, i = xs
    # Each micro-batch draws its own dropout mask; reusing `rng` would repeat one mask.
    (loss, (correct, batch_stats)), grads = gradients(
      trainable, micro_batch, batch_stats, jax.random.fold_in(rng, i)
    )
    return (jax.tree.map(jnp.add, grads_sum, grads), batch_stats), (loss, correct)

  # A scan rather than a Python loop: one traced body, so compile time does not grow with
  # `accum_steps`, and only one micro-batch's activations are live at a time.
  zeros = jax.tree.map(jnp.zeros_like, trainable)
  (grads, batch_stats), (losses, correct) = lax.scan(
    micro_step, (zeros, batch_stats), (micro, jnp.arange(accum_steps))
  )
  grads = jax.tree.map(lambda g: g / accum_steps, grads)
  loss, accuracy = jnp.mean(losses), jnp.mean(correct)
  return loss, accuracy, batch_stats, grads


def train_step(
  state: TrainState,
  batch: dict,
  rng: jax.Array,
  *,
  model: nn.Module,
  tx: optax.GradientTransformation,
  trainable_mask: PyTree,
  label_smoothing: float = 0.0,
  learning_rate_fn: Callable | None = None,
  skip_nonfinite: bool = False,
  accum_steps: int = 1,
  ema_decay: float = 0.0,
  ema: Mapping[str, np.ndarray | None] | None = None,
) -> tuple[TrainState, dict]:
  """One optimizer step on this device's share of the batch.

  Args:
    state: the replicated train state.
    batch: `{'image': [b, H, W, C], 'label': [b]}`, this device's share.
    rng: the run's base key; the step folds in the step number and the device index.
    model: the bound model (see `bind_model`).
    tx: the plan's optimizer (`ftlab.plans.optim.make`).
    trainable_mask: the plan's boolean mask (Python bools, read at trace time).
    label_smoothing: label smoothing of the cross-entropy.
    learning_rate_fn: the schedule, reported as `lr` when given.
    skip_nonfinite: when the loss or gradient norm is not finite, keep the parameters,
      statistics, optimizer state and EMA as they were (the step count still advances) and
      report `skipped` = 1.
    accum_steps: micro-batches the share is cut into (b must be divisible by it): each runs
      forward and backward in turn, and the update uses their mean gradient, which for a
      model without BatchNorm is the whole share's gradient up to float rounding. BatchNorm
      normalises each micro-batch by its own statistics and updates its running statistics
      once per micro-batch, as `accum_steps` smaller steps would.
    ema_decay: the EMA's decay per step (0: no EMA).
    ema: the entries the EMA keeps (`ftlab.ema.entries`).

  Returns:
    The new state and metrics averaged over devices: `loss`, `accuracy`, `grad_norm`
    (global norm of the trainable gradient) and `lr`.
  """
  # The step number comes from the state, not the host, so a resumed run draws the keys the
  # uninterrupted run would; the device index gives each shard its own dropout.
  rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), lax.axis_index(AXIS))
  trainable, frozen = paths.split(state.params, trainable_mask)

  loss, accuracy, batch_stats, grads = _gradients(
    trainable, frozen, state.batch_stats, batch, rng, model, label_smoothing, accum_steps
  )
  # Averaged before the optimizer, so every device applies the same update and the replicas
  # never drift apart; the metrics below are averaged for the same reason.
  grads = lax.pmean(grads, AXIS)
  # The optimizer sees the full tree; frozen gradients are constants it maps to zero.
  full_grads = paths.merge({p: jnp.zeros_like(x) for p, x in frozen.items()}, grads)
  # `state.params` is passed for weight decay and L2-SP, which read the current weights.
  updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
  flat_updates = paths.flatten(updates)
  # Cast back to the leaf's dtype: an update in a wider dtype would otherwise promote the
  # leaf, and a state whose dtypes change between steps recompiles the step and cannot reuse
  # its donated buffers. Frozen leaves are not touched at all, so they stay bit-identical.
  new_trainable = {p: (x + flat_updates[p]).astype(x.dtype) for p, x in trainable.items()}
  # The norm of the averaged gradient over trainable leaves only, the same quantity clipping
  # sees (`ftlab.plans.optim`).
  metrics = {'loss': loss, 'accuracy': accuracy, 'grad_norm': optax.tree.norm(grads)}
  metrics = lax.pmean(metrics, AXIS)
  if learning_rate_fn is not None:
    # The schedule at the step count before the increment: the rate this update used.
    metrics['lr'] = learning_rate_fn(state.step)
  new_params = paths.merge(frozen, new_trainable)
  # The average follows the weights after this update, as timm's and big_vision's do.
  new_ema = ema_.update(state.ema, new_params, ema, ema_decay) if ema_decay else state.ema
  if skip_nonfinite:
    # The metrics are averaged over devices, so every device takes the same decision.
    finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])
    # A select rather than a Python branch: the decision is a traced value. The step count
    # below still advances, so the schedule and the keys move on as if the step had run.
    keep = lambda new, old: jnp.where(finite, new, old)
    new_params = paths.merge(frozen, jax.tree.map(keep, new_trainable, trainable))
    batch_stats = jax.tree.map(keep, batch_stats, state.batch_stats)
    opt_state = jax.tree.map(keep, opt_state, state.opt_state)
    new_ema = jax.tree.map(keep, new_ema, state.ema)
    metrics['skipped'] = 1.0 - finite.astype(jnp.float32)
  new_state = state.replace(
    step=state.step + 1,
    params=new_params,
    batch_stats=batch_stats,
    opt_state=opt_state,
    ema=new_ema,
  )
  return new_state, metrics


def eval_step(state: TrainState, batch: dict, *, model: nn.Module) -> dict:
  """Sums over this device's share, added over devices: exact under padding.

  Args:
    state: the replicated train state.
    batch: `{'image', 'label'}` and optionally `'mask'` (1 for real examples, 0 for
      padding), this device's share.
    model: the bound model.

  Returns:
    `loss_sum`, `correct` and `count` over the real examples of the global batch.
  """
  logits = model.apply(
    model_variables(state.params, state.batch_stats), batch['image'], train=False
  )
  # Padding rows (mask 0) still run through the model, because every device needs the same
  # shapes, but contribute nothing to the sums.
  mask = batch.get('mask', jnp.ones(batch['label'].shape, jnp.float32)).astype(jnp.float32)
  sums = {
    'loss_sum': jnp.sum(cross_entropy(logits, batch['label']) * mask),
    'correct': jnp.sum((jnp.argmax(logits, -1) == batch['label']) * mask),
    'count': jnp.sum(mask),
  }
  # Sums, not means, are combined: a mean of per-device means would weigh a device holding
  # mostly padding like a full one.
  return lax.psum(sums, AXIS)


def eval_metrics(sums: dict) -> dict:
  """`loss` and `accuracy` from summed eval counts (of one or many batches)."""
  # An empty split gives zeros rather than a division by zero.
  count = max(float(sums['count']), 1.0)
  return {
    'loss': float(sums['loss_sum']) / count,
    'accuracy': float(sums['correct']) / count,
    'count': int(sums['count']),
  }


def evaluate(p_eval_step: Callable, state: Any, spread: Any, batches: Iterable[dict]) -> dict:
  """Exact eval: `p_eval_step`'s sums over every (padded, masked) batch, then means on the host.

  Args:
    p_eval_step: a spread `eval_step` (`compile_steps`), or any step returning its sums.
    state: what the step takes first (the replicated state).
    spread: the `Spread` the step was compiled for.
    batches: this process's padded host batches (`input_pipeline.eval_iterator`).

  Returns:
    `loss`, `accuracy` and `count` (see `eval_metrics`).
  """
  totals = None
  for batch in batches:
    sums = in_dispatch_order(p_eval_step(state, spread.shard(batch)))
    # The totals stay on the devices; the one `device_get` below is the evaluation's only
    # host sync, so batches are dispatched without waiting on each other.
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  return eval_metrics(jax.device_get(spread.unreplicate(totals)))


def compile_steps(
  spread: Any,
  *,
  model: nn.Module,
  tx: optax.GradientTransformation,
  plan: policies.Plan,
  label_smoothing: float = 0.0,
  learning_rate_fn: Callable | None = None,
  skip_nonfinite: bool = False,
  accum_steps: int = 1,
  ema_decay: float = 0.0,
) -> tuple[Callable, Callable]:
  """The spread train and eval steps for `plan`: `p_train_step(state, batch, rng)` with the
  state donated, and `p_eval_step(state, batch)`.

  Args:
    spread: a `ftlab.parallel.Spread`.
    model: the unbound model; it is bound to the plan here.
    tx: the plan's optimizer.
    plan: the fine-tuning plan.
    label_smoothing: label smoothing of the training loss.
    learning_rate_fn: the schedule, reported as the `lr` metric.
    skip_nonfinite, accum_steps, ema_decay: see `train_step` (the EMA keeps the plan's
      `ftlab.ema.entries`).
  """
  bound = bind_model(model, plan)
  train_fn = functools.partial(
    train_step,
    model=bound,
    tx=tx,
    trainable_mask=plan.trainable_mask,
    label_smoothing=label_smoothing,
    learning_rate_fn=learning_rate_fn,
    skip_nonfinite=skip_nonfinite,
    accum_steps=accum_steps,
    ema_decay=ema_decay,
    ema=ema_.entries(plan) if ema_decay else None,
  )
  # Donating the state lets XLA write the new state into the old one's buffers (one copy of
  # the parameters and moments on the device, not two). A caller must not touch the state it
  # passed in after the call; `Spread.replicate` copies through the host for that reason.
  p_train_step = spread.compile(
    train_fn, in_kinds=(REPLICATED, SHARDED, BROADCAST), donate_argnums=(0,)
  )
  return p_train_step, compile_eval_step(spread, model, plan)


def compile_eval_step(spread: Any, model: nn.Module, plan: policies.Plan) -> Callable:
  """The spread `eval_step` for `plan`: `p_eval_step(state, batch) -> sums` (compiled at its
  first call, as every spread step)."""
  # No donation here: the evaluators read the same state the training goes on with.
  return spread.compile(
    functools.partial(eval_step, model=bind_model(model, plan)), in_kinds=(REPLICATED, SHARDED)
  )
