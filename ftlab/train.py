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

from ftlab import paths
from ftlab.parallel import AXIS, BROADCAST, REPLICATED, SHARDED
from ftlab.plans import policies
from ftlab.plans.methods import lora

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything a step changes.

  Attributes:
    step: number of steps taken (int32 scalar).
    params: the model parameters.
    batch_stats: BatchNorm running statistics (empty for models without BatchNorm).
    opt_state: optimizer state (nothing for frozen leaves).
    ema: the moving average of the entries that can change (`ema_entries`), as a tree like
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
  an EMA of the `ema` entries (`ema_entries`) starting at their loaded values."""
  params = variables['params']
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get('batch_stats', {}),
    opt_state=tx.init(params),
    ema=init_ema(params, ema) if ema else {},
  )


def check_step_options(accum_steps: int, ema_decay: float, global_batch: int) -> None:
  """Raises ValueError, in one line, for an `accum_steps` that does not split each device's
  share of `global_batch` evenly or an `ema_decay` outside [0, 1)."""
  per_device = global_batch // jax.device_count()
  if not isinstance(accum_steps, int) or accum_steps < 1 or per_device % accum_steps:
    raise ValueError(
      f'accum_steps={accum_steps} must divide the {per_device} examples each of the '
      f'{jax.device_count()} devices gets of batch_size {global_batch}'
    )
  if not 0.0 <= ema_decay < 1.0:
    raise ValueError(f'ema_decay={ema_decay} is not in [0, 1) (e.g. 0.999; 0 = no EMA)')


def ema_entries(plan: policies.Plan) -> dict[str, np.ndarray | None]:
  """Which entries an EMA of the weights keeps: each trainable leaf whole (None), or the flat
  indices of the entries a per-element plan trains (or resamples). Frozen leaves and frozen
  entries never change, so their average is their value: nothing is stored for them."""
  found = {}
  for path, trainable in plan.flat_mask().items():
    levels = plan.element_levels.get(path)
    if not trainable:
      continue
    whole = levels is None or (np.ndim(levels) == 0 and levels == policies.TRAINED)
    entries = None if whole else np.flatnonzero(np.ravel(levels) != policies.FROZEN)
    if entries is None or len(entries):  # a leaf none of whose entries train never changes
      found[path] = entries
  return found


def _kept(x: jnp.ndarray, indices: np.ndarray | None) -> jnp.ndarray:
  return x if indices is None else x.reshape(-1)[indices]


def init_ema(params: PyTree, entries: Mapping[str, np.ndarray | None]) -> PyTree:
  """The EMA's starting value: the kept entries of `params` (`ema_entries`)."""
  flat = paths.flatten(params)
  return paths.unflatten({p: jnp.asarray(_kept(flat[p], i)) for p, i in entries.items()})


def update_ema(
  ema: PyTree, params: PyTree, entries: Mapping[str, np.ndarray | None], decay: float
) -> PyTree:
  """`decay * ema + (1 - decay) * params` on the kept entries."""
  flat, old = paths.flatten(params), paths.flatten(ema)
  return paths.unflatten(
    {p: decay * old[p] + (1.0 - decay) * _kept(flat[p], i) for p, i in entries.items()}
  )


def ema_params(params: PyTree, ema: PyTree, entries: Mapping[str, np.ndarray | None]) -> PyTree:
  """`params` with the EMA in place of the kept entries: the averaged model's parameters."""
  flat, averaged = paths.flatten(params), paths.flatten(ema)
  for p, i in entries.items():
    x = flat[p]
    if i is None:
      flat[p] = averaged[p]
    else:
      flat[p] = jnp.asarray(x).reshape(-1).at[i].set(averaged[p]).reshape(x.shape)
  return paths.unflatten(flat)


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


def model_variables(params: PyTree, batch_stats: PyTree) -> dict:
  """What `model.apply` takes for a state's `params` and `batch_stats` (none: left out).

  The one place parameters meet `model.apply` in the steps and evaluators: LoRA adapters are
  folded into their kernels here (a plain tree passes as it is), so the model stays a VGG.
  """
  return {'params': lora.fold(params), **({'batch_stats': batch_stats} if batch_stats else {})}


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
  micro = jax.tree.map(lambda x: x.reshape(accum_steps, -1, *x.shape[1:]), batch)

  def micro_step(carry, xs):
    grads_sum, batch_stats = carry
    micro_batch, i = xs
    (loss, (correct, batch_stats)), grads = gradients(
      trainable, micro_batch, batch_stats, jax.random.fold_in(rng, i)
    )
    return (jax.tree.map(jnp.add, grads_sum, grads), batch_stats), (loss, correct)

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
    ema: the entries the EMA keeps (`ema_entries`).

  Returns:
    The new state and metrics averaged over devices: `loss`, `accuracy`, `grad_norm`
    (global norm of the trainable gradient) and `lr`.
  """
  rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), lax.axis_index(AXIS))
  trainable, frozen = paths.split(state.params, trainable_mask)

  loss, accuracy, batch_stats, grads = _gradients(
    trainable, frozen, state.batch_stats, batch, rng, model, label_smoothing, accum_steps
  )
  grads = lax.pmean(grads, AXIS)
  # The optimizer sees the full tree; frozen gradients are constants it maps to zero.
  full_grads = paths.merge({p: jnp.zeros_like(x) for p, x in frozen.items()}, grads)
  updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
  flat_updates = paths.flatten(updates)
  new_trainable = {p: (x + flat_updates[p]).astype(x.dtype) for p, x in trainable.items()}
  metrics = {'loss': loss, 'accuracy': accuracy, 'grad_norm': optax.tree.norm(grads)}
  metrics = lax.pmean(metrics, AXIS)
  if learning_rate_fn is not None:
    metrics['lr'] = learning_rate_fn(state.step)
  new_params = paths.merge(frozen, new_trainable)
  new_ema = update_ema(state.ema, new_params, ema, ema_decay) if ema_decay else state.ema
  if skip_nonfinite:
    # The metrics are averaged over devices, so every device takes the same decision.
    finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])
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
    logits = model.apply(model_variables(params, state.batch_stats), image[None], train=False)
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
  model in inference mode (RigL's growth criterion, `ftlab.plans.dynamic_masks`).

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
    logits = model.apply(model_variables(params, state.batch_stats), batch['image'], train=False)
    return jnp.sum(cross_entropy(logits, batch['label']) * weights)

  grads = jax.grad(loss_fn)(scored)
  return lax.psum({'grads': grads, 'count': jnp.sum(weights)}, AXIS)


def compile_scoring_step(
  kind: str, spread: Any, model: nn.Module, scope: policies.Plan, global_batch: int
) -> Callable:
  """`fisher_step` (`kind='fisher'`) or `gradient_step` (`'gradient'`) over the leaves
  `scope` may train, spread: `p_step(state, batch) -> sums`. `model` is bound (`bind_model`)."""
  step_fn = functools.partial(
    fisher_step if kind == 'fisher' else gradient_step,
    model=model,
    trainable_mask=scope.trainable_mask,
  )
  if kind == 'fisher':  # per-example gradients in chunks that divide the device's share
    per_device = global_batch // jax.device_count()
    step_fn = functools.partial(step_fn, chunk=max(c for c in range(1, 9) if per_device % c == 0))
  return spread.compile(step_fn, in_kinds=(REPLICATED, SHARDED))


def summed(p_step: Callable, spread: Any, variables: PyTree, batches: Iterable[dict]) -> dict:
  """`p_step`'s sums over `batches` at `variables` (`{'params', 'batch_stats'}`), on the host."""
  stats = variables.get('batch_stats', {})
  state = spread.replicate(TrainState(jnp.zeros((), jnp.int32), variables['params'], stats, ()))
  totals = None
  for batch in batches:
    sums = p_step(state, spread.shard(batch))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  return jax.device_get(spread.unreplicate(totals))


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
      `ema_entries`).
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
    ema=ema_entries(plan) if ema_decay else None,
  )
  eval_fn = functools.partial(eval_step, model=bound)
  p_train_step = spread.compile(
    train_fn, in_kinds=(REPLICATED, SHARDED, BROADCAST), donate_argnums=(0,)
  )
  p_eval_step = spread.compile(eval_fn, in_kinds=(REPLICATED, SHARDED))
  return p_train_step, p_eval_step


def compile_ema_state(spread: Any, plan: policies.Plan) -> Callable:
  """`p_ema_state(state)`: the replicated state with the EMA in place of the parameters it
  averages, for the eval step (BatchNorm keeps its running statistics)."""
  entries = ema_entries(plan)
  swap = lambda state: state.replace(params=ema_params(state.params, state.ema, entries))
  return spread.compile(swap, in_kinds=(REPLICATED,))
