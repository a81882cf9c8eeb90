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
import json
import os
import re
import time
import types
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax import lax

from ftlab import checkpoint, input_pipeline, metric_writers, optim, parallel, policies
from ftlab.models import vgg
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

  Returns:
    The new state and metrics averaged over devices: `loss`, `accuracy`, `grad_norm`
    (global norm of the trainable gradient) and `lr`.
  """
  rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), lax.axis_index(AXIS))
  mask = policies.flatten(trainable_mask)
  flat_params = policies.flatten(state.params)
  trainable = {p: x for p, x in flat_params.items() if mask[p]}
  frozen = {p: x for p, x in flat_params.items() if not mask[p]}

  def loss_fn(trainable):
    params = policies.unflatten({**frozen, **trainable})
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
  full_grads = policies.unflatten({**{p: jnp.zeros_like(x) for p, x in frozen.items()}, **grads})
  updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
  flat_updates = policies.flatten(updates)
  new_trainable = {p: (x + flat_updates[p]).astype(x.dtype) for p, x in trainable.items()}
  metrics = {
    'loss': loss,
    'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
    'grad_norm': optax.tree.norm(grads),
  }
  metrics = lax.pmean(metrics, AXIS)
  if learning_rate_fn is not None:
    metrics['lr'] = learning_rate_fn(state.step)
  new_state = state.replace(
    step=state.step + 1,
    params=policies.unflatten({**frozen, **new_trainable}),
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


def eval_metrics(sums: dict) -> dict:
  """`loss` and `accuracy` from summed eval counts (of one or many batches)."""
  count = max(float(sums['count']), 1.0)
  return {
    'loss': float(sums['loss_sum']) / count,
    'accuracy': float(sums['correct']) / count,
    'count': int(sums['count']),
  }


def compile_steps(
  spread: Any,
  *,
  model: nn.Module,
  tx: optax.GradientTransformation,
  plan: policies.Plan,
  label_smoothing: float = 0.0,
  learning_rate_fn: Callable | None = None,
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
  """
  bound = bind_model(model, plan)
  train_fn = functools.partial(
    train_step,
    model=bound,
    tx=tx,
    trainable_mask=plan.trainable_mask,
    label_smoothing=label_smoothing,
    learning_rate_fn=learning_rate_fn,
  )
  eval_fn = functools.partial(eval_step, model=bound)
  p_train_step = spread.compile(
    train_fn, in_kinds=(REPLICATED, SHARDED, BROADCAST), donate_argnums=(0,)
  )
  p_eval_step = spread.compile(eval_fn, in_kinds=(REPLICATED, SHARDED))
  return p_train_step, p_eval_step


# --- The loop. --------------------------------------------------------------------------------


class ConfigError(ValueError):
  """A config or input problem, found before any compute starts."""


DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def build_model(model_cfg: Any, num_classes: int) -> nn.Module:
  """The VGG that `config.model` describes, with `num_classes` outputs."""
  if model_cfg.dtype not in DTYPES:
    raise ValueError(f'model dtype {model_cfg.dtype!r} is not one of {list(DTYPES)}')
  return vgg.by_name(
    model_cfg.name,
    num_classes=num_classes,
    head=model_cfg.head,
    width=float(model_cfg.width),
    dropout_rate=float(model_cfg.dropout_rate),
    adaptive_pool=int(model_cfg.get('adaptive_pool', 0)),
    dtype=DTYPES[model_cfg.dtype],
  )


def init_variables(model: nn.Module, image_size: int, rng: jax.Array, init_cfg: Any) -> PyTree:
  """Fresh variables, then (if `init_cfg.checkpoint`) the checkpoint's, strictly checked.

  Parameters matching an `init_cfg.dont_load` regex keep their fresh values (a new head).
  """
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(rng, x)
  if not init_cfg.checkpoint:
    return variables
  dont_load = tuple(init_cfg.dont_load)
  source = init_cfg.checkpoint
  if os.path.isdir(os.path.join(source, 'checkpoints')):  # a run's workdir
    source = os.path.join(source, 'checkpoints')
  loaded = {'params': checkpoint.load_params(source, variables['params'], dont_load=dont_load)}
  if 'batch_stats' in variables:
    # The same patterns, less those that name no statistics (a dense head has none).
    stats_paths = policies.flatten(variables['batch_stats'])
    stats_dont_load = [p for p in dont_load if any(re.fullmatch(p, q) for q in stats_paths)]
    loaded['batch_stats'] = checkpoint.load_params(
      source, variables['batch_stats'], dont_load=stats_dont_load, key='batch_stats'
    )
  return loaded


def evaluate(p_eval_step: Callable, state: TrainState, spread: Any, batches: Any) -> dict:
  """Exact eval: sums over every (padded, masked) batch, then means on the host."""
  totals = None
  for batch in batches:
    sums = p_eval_step(state, spread.shard(batch))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  return eval_metrics(jax.device_get(spread.unreplicate(totals)))


def _mean_metrics(pending: list[dict], first_step: int) -> dict:
  """Means of per-step train metrics; a non-finite value stops the run naming its step."""
  for i, metrics in enumerate(pending):
    bad = [k for k, v in sorted(metrics.items()) if not np.isfinite(v)]
    if bad:
      raise FloatingPointError(
        f'non-finite train/{bad[0]} ({metrics[bad[0]]}) at step {first_step + i}; '
        'the last checkpoint is kept'
      )
  return {k: float(np.mean([m[k] for m in pending])) for k in pending[0]}


def train_and_evaluate(config: Any, workdir: str) -> dict:
  """Trains and evaluates as `config` says, resuming from `workdir` if it holds a checkpoint.

  Writes (process 0 only): `config.json`, `plan.txt`, `metrics.jsonl`, TensorBoard events
  and `summary.json`; every process takes part in `checkpoints/`.

  Args:
    config: a config from `configs/` (see `configs/default.py` for every field).
    workdir: the run directory.

  Returns:
    The summary dict written to `summary.json`.

  Raises:
    ConfigError: a bad config or input, before anything is compiled or written.
    FloatingPointError: a non-finite loss or gradient norm.
  """
  wall_start = time.time()
  if config.multi_host:
    jax.distributed.initialize()
  try:
    spread, model, plan, tx, state, data = _prepare(config, workdir)
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise ConfigError(str(e).strip('"\'')) from e
  is_writer = jax.process_index() == 0
  if is_writer:
    _write_run_files(workdir, config, plan, state.params)
  n_trainable, n_total = policies.trainable_count(plan, state.params)
  lr_fn = optim.learning_rate_schedule(config.optimizer, config.num_train_steps)
  p_train_step, p_eval_step = compile_steps(
    spread,
    model=model,
    tx=tx,
    plan=plan,
    label_smoothing=config.label_smoothing,
    learning_rate_fn=lr_fn,
  )
  rng_train = jax.random.fold_in(jax.random.key(config.seed), 1)
  first_step, last = int(state.step), config.num_train_steps
  state = spread.replicate(state)
  writer = metric_writers.MetricWriter(workdir, enabled=is_writer)
  # Best and early stopping follow the held-out minival split when there is one.
  select = 'minival' if 'minival' in data.eval_batches else 'eval'

  def run_evals(step):
    results = {}
    for name, batches in data.eval_batches.items():
      results[name] = evaluate(p_eval_step, state, spread, batches())
      writer.write(step, {f'{name}/{k}': v for k, v in results[name].items()})
      logging.info(
        'step %d: %s accuracy %.4f on %d examples',
        step,
        name,
        results[name]['accuracy'],
        results[name]['count'],
      )
    return results

  train_batches = parallel.prefetch_to_devices(data.train_batches(first_step), spread)
  meta = {'plan': plan.name, 'config': config.to_dict()}
  pending, best, evals_since_best, results, stop = [], None, 0, {}, False
  window_start, window_first = time.time(), first_step + 1
  logging.info('training steps %d..%d under %s', first_step + 1, last, plan.name)
  for step in range(first_step + 1, last + 1):
    state, metrics = p_train_step(state, next(train_batches), rng_train)
    pending.append(metrics)
    if step % config.log_every_steps == 0 or step == last:
      means = _mean_metrics(jax.device_get([spread.unreplicate(m) for m in pending]), window_first)
      steps_per_sec = len(pending) / (time.time() - window_start)
      means['examples_per_sec'] = steps_per_sec * config.batch_size
      writer.write(step, {f'train/{k}': v for k, v in means.items()})
      logging.info(
        'step %d/%d: loss %.4f, accuracy %.4f, %.2f steps/s, ETA %.0f s',
        step,
        last,
        means['loss'],
        means['accuracy'],
        steps_per_sec,
        (last - step) / steps_per_sec,
      )
      pending, window_start, window_first = [], time.time(), step + 1
    if step % config.eval_every_steps == 0 or step == last:
      results = run_evals(step)
      if best is None or results[select]['accuracy'] > best['accuracy']:
        best, evals_since_best = {'accuracy': results[select]['accuracy'], 'step': step}, 0
      else:
        evals_since_best += 1
        stop = 0 < config.early_stopping_patience <= evals_since_best
    if step % config.checkpoint_every_steps == 0 or step == last or stop:
      host_state = jax.device_get(spread.unreplicate(state))
      checkpoint.save(
        os.path.join(workdir, 'checkpoints'),
        step,
        host_state,
        dict(meta, step=step),
        max_to_keep=config.keep_checkpoints,
      )
    if stop:
      logging.info(
        'early stop at step %d: %d evals without a better %s accuracy',
        step,
        evals_since_best,
        select,
      )
      break
  if not results:  # resumed at the end: evaluate what was restored
    results = run_evals(first_step)
  writer.close()
  summary = {
    'plan': plan.name,
    'steps': int(jax.device_get(spread.unreplicate(state.step))),
    'final_eval_accuracy': results['eval']['accuracy'],
    'final_eval_loss': results['eval']['loss'],
    'eval_examples': results['eval']['count'],
    **({'final_minival_accuracy': results['minival']['accuracy']} if 'minival' in results else {}),
    f'best_{select}_accuracy': best and best['accuracy'],
    f'best_{select}_step': best and best['step'],
    'stopped_early': stop,
    'trainable_parameters': n_trainable,
    'total_parameters': n_total,
    'trainable_percent': 100.0 * n_trainable / n_total,
    'wall_time_sec': time.time() - wall_start,
  }
  if is_writer:
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=2)
  return summary


def _write_run_files(workdir: str, config: Any, plan: policies.Plan, params: PyTree) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2) + '\n')
  table = policies.audit_table(plan, params)
  with open(os.path.join(workdir, 'plan.txt'), 'w') as f:
    f.write(table + '\n')
  logging.info('\n%s', table)


def _data(config: Any) -> tuple[Any, dict[str, Any]]:
  """The training split and the eval splits (`eval`, and `minival` if configured)."""
  ds = config.dataset
  common = dict(
    data_dir=ds.data_dir or None,
    download=ds.download,
    fashion_mnist_dir=ds.local_dir or None,
    classes=tuple(ds.classes),
    seed=config.seed,
  )
  train_split, splits = ds.train_split, {'eval': ds.eval_split}
  if ds.minival:
    train_split, splits['minival'] = input_pipeline.minival_split(ds.train_split, ds.minival)
  train_data = input_pipeline.build_dataset(
    ds.name, train_split, examples_per_class=ds.examples_per_class, **common
  )
  evals = {k: input_pipeline.build_dataset(ds.name, s, **common) for k, s in splits.items()}
  return train_data, evals


def _prepare(config: Any, workdir: str):
  """Everything up to the first compile: every config or input error surfaces here."""
  spread = parallel.Spread(config.parallelism)
  parallel.check_divisible(config.batch_size, jax.device_count())
  parallel.check_divisible(config.eval_batch_size, jax.device_count())
  policies.check_policy_name(config.policy.name)
  train_data, evals = _data(config)
  model = build_model(config.model, train_data.num_classes)
  rng_init = jax.random.fold_in(jax.random.key(config.seed), 0)
  size = config.dataset.image_size
  # Shapes before arrays: the plan and the optimizer are checked before any compute.
  shapes = jax.eval_shape(
    functools.partial(model.init, train=False), rng_init, jnp.zeros((1, size, size, 3))
  )
  plan = policies.make_plan(shapes['params'], model.block_structure(), config.policy)
  tx = optim.make(plan, config.optimizer, config.num_train_steps)
  state = create_train_state(init_variables(model, size, rng_init, config.init), tx)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  if checkpoint.latest_step(ckpt_dir) is not None:
    state = _resume(ckpt_dir, state, plan)
  pipeline = dict(
    image_size=size,
    preprocess=config.dataset.preprocess,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  data = types.SimpleNamespace(
    train_batches=lambda start_step: input_pipeline.train_iterator(
      train_data,
      global_batch=config.batch_size,
      augment=config.dataset.augment,
      seed=config.seed,
      start_step=start_step,
      shuffle_buffer=config.dataset.shuffle_buffer,
      **pipeline,
    ),
    eval_batches={
      k: functools.partial(
        input_pipeline.eval_iterator, d, global_batch=config.eval_batch_size, **pipeline
      )
      for k, d in evals.items()
    },
  )
  return spread, model, plan, tx, state, data


def _resume(ckpt_dir: str, state: TrainState, plan: policies.Plan) -> TrainState:
  """The workdir's latest checkpoint; under a changed plan, its parameters and step only."""
  meta = checkpoint.restore_meta(ckpt_dir)
  if meta.get('plan') == plan.name:
    restored, _ = checkpoint.restore(ckpt_dir, state)
    logging.info('resumed from step %d', int(restored.step))
    return restored
  # A new stage: parameters carry over, the optimizer state is rebuilt for the new plan.
  logging.info(
    'plan changed from %s to %s at step %d: optimizer state rebuilt',
    meta.get('plan'),
    plan.name,
    meta['step'],
  )
  params = checkpoint.load_params(ckpt_dir, state.params)
  stats = (
    checkpoint.load_params(ckpt_dir, state.batch_stats, key='batch_stats')
    if state.batch_stats
    else state.batch_stats
  )
  return state.replace(step=jnp.asarray(meta['step'], jnp.int32), params=params, batch_stats=stats)
