"""The train state and the per-device steps.

`train_step` and `eval_step` are pure functions written for one device, with every
collective over the axis `'batch'`; `ftlab.parallel` spreads them over devices.
Everything static (the model, the optimizer, the mask) is keyword-only and bound with
`functools.partial` where the step is compiled.

The gradient is taken with respect to the trainable leaves only, so no backward work,
all-reduce or norm ever touches a frozen parameter; frozen leaves pass through the step
as the very same arrays.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

from ftlab import paths, policies
from ftlab.parallel import AXIS, BROADCAST, REPLICATED, SHARDED

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything a step changes.

  Attributes:
    step: number of steps taken (int32 scalar).
    params: the model parameters.
    batch_stats: BatchNorm running statistics (empty for models without BatchNorm).
    opt_state: optimizer state (nothing for frozen leaves).
  """

  step: jnp.ndarray
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree


def create_train_state(variables: PyTree, tx: optax.GradientTransformation) -> TrainState:
  """A state at step 0 from model variables (`{'params': ..., 'batch_stats': ...}`)."""
  params = variables['params']
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get('batch_stats', {}),
    opt_state=tx.init(params),
  )


def bind_model(model: nn.Module, plan: policies.Plan, axis_name: str | None = AXIS) -> nn.Module:
  """The model as the step runs it: BatchNorm statistics averaged over `axis_name`, and
  the BatchNorm layers of the plan's frozen layers on running statistics."""
  return model.clone(axis_name=axis_name, frozen_batch_norm=tuple(plan.frozen_layers))


def cross_entropy(
  logits: jnp.ndarray, labels: jnp.ndarray, label_smoothing: float = 0.0
) -> jnp.ndarray:
  """Per-example softmax cross-entropy against integer labels, optionally smoothed."""
  targets = jax.nn.one_hot(labels, logits.shape[-1])
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def _variables(params: PyTree, batch_stats: PyTree) -> dict:
  return {'params': params, **({'batch_stats': batch_stats} if batch_stats else {})}


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
) -> tuple[TrainState, dict]:
  """One optimizer step on this device's share of the batch.

  Args:
    state: the replicated train state.
    batch: `{'image': [b, H, W, C], 'label': [b]}`, this device's share.
    rng: the run's base key; the step folds in the step number and the device index.
    model: the bound model (see `bind_model`).
    tx: the plan's optimizer (`ftlab.optim.make`).
    trainable_mask: the plan's boolean mask (Python bools, read at trace time).
    label_smoothing: label smoothing of the cross-entropy.
    learning_rate_fn: the schedule, reported as `lr` when given.
    skip_nonfinite: when the loss or gradient norm is not finite, keep the parameters,
      statistics and optimizer state as they were (the step count still advances) and
      report `skipped` = 1.

  Returns:
    The new state and metrics averaged over devices: `loss`, `accuracy`, `grad_norm`
    (global norm of the trainable gradient) and `lr`.
  """
  rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), lax.axis_index(AXIS))
  trainable, frozen = paths.split(state.params, trainable_mask)

  def loss_fn(trainable):
    params = paths.merge(frozen, trainable)
    logits, new_vars = model.apply(
      _variables(params, state.batch_stats),
      batch['image'],
      train=True,
      mutable=['batch_stats'],
      rngs={'dropout': rng},
    )
    loss = cross_entropy(logits, batch['label'], label_smoothing).mean()
    return loss, (logits, new_vars.get('batch_stats', {}))

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
  grads = lax.pmean(grads, AXIS)
  # The optimizer sees the full tree; frozen gradients are constants it maps to zero.
  full_grads = paths.merge({p: jnp.zeros_like(x) for p, x in frozen.items()}, grads)
  updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
  flat_updates = paths.flatten(updates)
  new_trainable = {p: (x + flat_updates[p]).astype(x.dtype) for p, x in trainable.items()}
  metrics = {
    'loss': loss,
    'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
    'grad_norm': optax.tree.norm(grads),
  }
  metrics = lax.pmean(metrics, AXIS)
  if learning_rate_fn is not None:
    metrics['lr'] = learning_rate_fn(state.step)
  if skip_nonfinite:
    # The metrics are averaged over devices, so every device takes the same decision.
    finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])
    keep = lambda new, old: jnp.where(finite, new, old)
    new_trainable = jax.tree.map(keep, new_trainable, trainable)
    batch_stats = jax.tree.map(keep, batch_stats, state.batch_stats)
    opt_state = jax.tree.map(keep, opt_state, state.opt_state)
    metrics['skipped'] = 1.0 - finite.astype(jnp.float32)
  new_state = state.replace(
    step=state.step + 1,
    params=paths.merge(frozen, new_trainable),
    batch_stats=batch_stats,
    opt_state=opt_state,
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
  logits = model.apply(_variables(state.params, state.batch_stats), batch['image'], train=False)
  mask = batch.get('mask', jnp.ones(batch['label'].shape, jnp.float32)).astype(jnp.float32)
  sums = {
    'loss_sum': jnp.sum(cross_entropy(logits, batch['label']) * mask),
    'correct': jnp.sum((jnp.argmax(logits, -1) == batch['label']) * mask),
    'count': jnp.sum(mask),
  }
  return lax.psum(sums, AXIS)


def fisher_step(
  state: TrainState, batch: dict, *, model: nn.Module, trainable_mask: PyTree, chunk: int = 8
) -> dict:
  """Sums of squared per-example gradients (the empirical Fisher's diagonal, unnormalised)
  of the trainable leaves over the real examples of the global batch.

  The model runs in inference mode (running BatchNorm statistics, no dropout), so each
  example's gradient is its own. Examples are taken `chunk` at a time (vmap inside a
  scan) so memory grows with the chunk, not the batch.

  Args:
    state: the replicated train state.
    batch: `{'image', 'label'}` and optionally `'mask'`, this device's share; its size must
      be a multiple of `chunk` (pass chunk=1 otherwise).
    model: the bound model.
    trainable_mask: which leaves to score.
    chunk: examples per vmapped gradient.

  Returns:
    `{'squared_grads': {path: sum of g**2}, 'count': number of real examples}`.
  """
  scored, fixed = paths.split(state.params, trainable_mask)
  weights = batch.get('mask', jnp.ones(batch['label'].shape, jnp.float32)).astype(jnp.float32)

  def example_loss(leaves, image, label):
    params = paths.merge(fixed, leaves)
    logits = model.apply(_variables(params, state.batch_stats), image[None], train=False)
    return cross_entropy(logits, label[None]).sum()

  def add_chunk(total, xs):
    image, label, weight = xs
    grads = jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))(scored, image, label)
    squares = jax.tree.map(lambda g: jnp.einsum('b...,b->...', g * g, weight), grads)
    return jax.tree.map(jnp.add, total, squares), None

  n = batch['label'].shape[0]
  if n % chunk:
    raise ValueError(f'fisher_step: {n} examples per device is not a multiple of chunk={chunk}')
  xs = jax.tree.map(
    lambda x: x.reshape(n // chunk, chunk, *x.shape[1:]),
    (batch['image'], batch['label'], weights),
  )
  zeros = jax.tree.map(jnp.zeros_like, scored)
  total, _ = lax.scan(add_chunk, zeros, xs)
  return lax.psum({'squared_grads': total, 'count': jnp.sum(weights)}, AXIS)


def gradient_step(
  state: TrainState, batch: dict, *, model: nn.Module, trainable_mask: PyTree
) -> dict:
  """The gradient of the summed loss over the real examples of the global batch, with the
  model in inference mode (RigL's growth criterion, `ftlab.dynamic_masks`).

  Args:
    state: the replicated train state.
    batch: `{'image', 'label'}` and optionally `'mask'`, this device's share.
    model: the bound model.
    trainable_mask: which leaves to differentiate.

  Returns:
    `{'grads': {path: summed gradient}, 'count': number of real examples}`.
  """
  scored, fixed = paths.split(state.params, trainable_mask)
  weights = batch.get('mask', jnp.ones(batch['label'].shape, jnp.float32)).astype(jnp.float32)

  def loss_fn(leaves):
    params = paths.merge(fixed, leaves)
    logits = model.apply(_variables(params, state.batch_stats), batch['image'], train=False)
    return jnp.sum(cross_entropy(logits, batch['label']) * weights)

  grads = jax.grad(loss_fn)(scored)
  return lax.psum({'grads': grads, 'count': jnp.sum(weights)}, AXIS)


def eval_metrics(sums: dict) -> dict:
  """`loss` and `accuracy` from summed eval counts (of one or many batches)."""
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
    sums = p_eval_step(state, spread.shard(batch))
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
    skip_nonfinite: see `train_step`.
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
  )
  eval_fn = functools.partial(eval_step, model=bound)
  p_train_step = spread.compile(
    train_fn, in_kinds=(REPLICATED, SHARDED, BROADCAST), donate_argnums=(0,)
  )
  p_eval_step = spread.compile(eval_fn, in_kinds=(REPLICATED, SHARDED))
  return p_train_step, p_eval_step
