"""The run loop: config -> data, model, plan, optimizer -> steps, evals, checkpoints, summary.

`train_and_evaluate(config, workdir)` is what `python -m ftlab.main` runs. Everything that
can be wrong with a config or its inputs is found in `_prepare`, before anything is compiled
or written, and raised as a `ConfigError` (exit code 2 on the command line).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
import re
import signal
import threading
import time
import types
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ftlab import (
  activation_cache,
  checkpoint,
  input_pipeline,
  metric_writers,
  optim,
  parallel,
  policies,
)
from ftlab.models import vgg
from ftlab.train import (
  TrainState,
  bind_model,
  compile_steps,
  create_train_state,
  eval_metrics,
  fisher_step,
)

PyTree = Any


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
    conv_lowering=model_cfg.get('conv_lowering', 'auto'),
    dtype=DTYPES[model_cfg.dtype],
  )


def init_variables(model: nn.Module, image_size: int, rng: jax.Array, init_cfg: Any) -> PyTree:
  """Fresh variables, then (if `init_cfg.checkpoint`) the checkpoint's, strictly checked.

  Parameters matching an `init_cfg.dont_load` regex keep their fresh values (a new head).

  Raises:
    ValueError: the checkpoint does not fit the model (the message says the likely cause
      and the flags that fix it) or holds inf/NaN (unless `init_cfg.allow_nonfinite`).
  """
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(rng, x)
  if not init_cfg.checkpoint:
    return variables
  dont_load = tuple(init_cfg.dont_load)
  source = init_cfg.checkpoint
  if os.path.isdir(os.path.join(source, 'checkpoints')):  # a run's workdir
    source = os.path.join(source, 'checkpoints')
  allow_nonfinite = bool(init_cfg.get('allow_nonfinite', False))
  load = functools.partial(checkpoint.load_params, source, allow_nonfinite=allow_nonfinite)
  try:
    loaded = {'params': load(variables['params'], dont_load=dont_load)}
    if 'batch_stats' in variables:
      # The same patterns, less those that name no statistics (a dense head has none).
      stats_paths = policies.flatten(variables['batch_stats'])
      stats_dont_load = [p for p in dont_load if any(re.fullmatch(p, q) for q in stats_paths)]
      loaded['batch_stats'] = load(
        variables['batch_stats'], dont_load=stats_dont_load, key='batch_stats'
      )
  except checkpoint.MismatchError as e:
    advice = mismatch_advice(e, model, image_size)
    raise ValueError(f'init.checkpoint: {e}' + (f'. {advice}' if advice else '')) from None
  except checkpoint.NonFiniteError as e:
    raise ValueError(
      f'init.checkpoint: {e}; a run started from them trains to NaN. Re-export the weights '
      '(a float16 save overflows beyond 65504), or set --config.init.allow_nonfinite=True '
      'to load them anyway'
    ) from None
  return loaded


def mismatch_advice(error: checkpoint.MismatchError, model: Any, image_size: int) -> str:
  """The likely cause of a checkpoint that does not fit the model, and the flags that fix it:
  another VGG (name, width, head), another class count, or an fc1 built for another image
  size; '' when the shapes tell nothing more than the error."""
  if error.unused_dont_load:
    layers = sorted({p.split('/')[0] for p in error.expected})
    return f'Paths are layer/name (e.g. predictions/kernel); the layers: {", ".join(layers)}'
  want, have = vgg.architecture_of(error.expected), vgg.architecture_of(error.found)
  fixes = []
  if have['name'] and have['name'] != want['name']:
    fixes.append(f'--config.model.name={have["name"]}')
  if have['width'] and want['width'] and not np.isclose(have['width'], want['width']):
    fixes.append(f'--config.model.width={have["width"]:g}')
  if have['head'] != want['head'] and have['head'] != 'none':
    fixes.append(f'--config.model.head={have["head"]}')
  if fixes:
    found = f'a {have["name"] or "VGG"} (width {have["width"]:g}, {have["head"]} head)'
    return f'Likely cause: the checkpoint is {found}, another model: {" ".join(fixes)}'
  advice = []
  layers = lambda paths: {p.split('/')[0] for p in paths}
  fresh = sorted(layers(set(error.expected) - error.skipped) - layers(error.found))
  if fresh and have['head'] == 'none':
    regexes = ', '.join(f'"{layer}/.*"' for layer in fresh)
    advice.append(
      f'the checkpoint has no head: start {", ".join(fresh)} fresh with '
      f"--config.init.dont_load='({regexes},)'"
    )
  differs = lambda p: (
    p in error.found
    and p in error.expected
    and p not in error.skipped
    and error.found[p] != error.expected[p]
  )
  if differs('predictions/kernel'):
    advice.append(
      f"the checkpoint's head has {have['num_classes']} classes, this task "
      f'{want["num_classes"]}: keep a fresh head with '
      """--config.init.dont_load='("predictions/.*",)'"""
    )
  first_dense = (
    'fc1/kernel' if differs('fc1/kernel') else 'fc/kernel' if differs('fc/kernel') else ''
  )
  if first_dense:
    channels = vgg.scaled(vgg.BLOCK_CHANNELS[-1], model.width)
    built = math.isqrt(error.found[first_dense][0] // channels)
    now = math.isqrt(error.expected[first_dense][0] // channels)
    layer = first_dense.split('/')[0]
    advice.append(
      f'{layer} was built for a {built}x{built}x{channels} block-5 map ({built * 32} px images '
      f'without pooling), and this model gives it {now}x{now} at image_size {image_size}: keep '
      f'the pretrained {layer} with --config.dataset.image_size={built * 32}, or with '
      f'--config.model.adaptive_pool={built} (average-pools block 5 to {built}x{built} at any '
      'image size, as torchvision does)'
    )
  return ('Likely cause: ' + '; and '.join(advice)) if advice else ''


def evaluate(p_eval_step: Callable, state: TrainState, spread: Any, batches: Any) -> dict:
  """Exact eval: sums over every (padded, masked) batch, then means on the host."""
  totals = None
  for batch in batches:
    sums = p_eval_step(state, spread.shard(batch))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  return eval_metrics(jax.device_get(spread.unreplicate(totals)))


class Preempted(Exception):
  """SIGTERM or SIGINT arrived: the current step finished and a checkpoint was written."""

  def __init__(self, step: int, signum: int):
    self.step, self.signum = step, signum
    name = signal.Signals(signum).name
    super().__init__(
      f'preempted at step {step} by {name}; checkpoint written, run the same command to resume'
    )


class FrozenParametersChanged(RuntimeError):
  """A frozen parameter is not bit-identical to its loaded value at the end of a run."""


def _check_finite(
  pending: list[dict], first_step: int, skip_nonfinite: bool, init_checkpoint: str = ''
) -> None:
  """Raises FloatingPointError naming the first step with a non-finite metric.

  In skip mode, skipped steps (whose update was not applied) are allowed. At step 1 no update
  has been applied yet, so the message points at the initial weights instead of suggesting
  skips that would skip every step.
  """
  for i, metrics in enumerate(pending):
    if skip_nonfinite and metrics.get('skipped'):
      continue
    bad = [k for k, v in sorted(metrics.items()) if not np.isfinite(v)]
    if not bad:
      continue
    step = first_step + i
    what = f'non-finite train/{bad[0]} ({metrics[bad[0]]}) at step {step}'
    if step == 1:
      source = f'init.checkpoint={init_checkpoint}' if init_checkpoint else 'the random init'
      raise FloatingPointError(
        f'{what}, before any update was applied: the initial weights ({source}) or the input '
        'data are the likely cause, not the optimizer; check them for inf/NaN'
      )
    raise FloatingPointError(
      f'{what}; stopped, the last checkpoint is kept (config.skip_nonfinite_updates skips '
      'such steps)'
    )


def _mean_metrics(pending: list[dict]) -> dict:
  """Means over the window's applied steps; `skipped_steps` counts the others."""
  applied = [m for m in pending if not m.get('skipped')] or pending
  means = {k: float(np.mean([m[k] for m in applied])) for k in pending[0] if k != 'skipped'}
  if 'skipped' in pending[0]:
    means['skipped_steps'] = float(sum(m['skipped'] for m in pending))
  return means


@contextlib.contextmanager
def _preemption_signals():
  """Records SIGTERM/SIGINT instead of dying mid-step; yields the list of signals received."""
  received: list[int] = []
  if threading.current_thread() is not threading.main_thread():
    yield received  # signal handlers can only be installed from the main thread
    return

  def record(signum, frame):
    del frame
    logging.warning(
      '%s received: finishing the step, then checkpointing', signal.Signals(signum).name
    )
    received.append(signum)

  previous = {s: signal.signal(s, record) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield received
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


def train_and_evaluate(config: Any, workdir: str, *, allow_config_change: bool = False) -> dict:
  """Trains and evaluates as `config` says, resuming from `workdir` if it holds a checkpoint.

  Writes (process 0 only): `config.json`, `plan.txt`, `metrics.jsonl`, TensorBoard events
  and `summary.json`; every process takes part in `checkpoints/`. A multi-stage plan
  (`lp_ft`, `gradual_unfreezing`) compiles one step per stage; at a stage boundary the
  parameters carry over and the optimizer state is rebuilt for the new plan.

  A workdir remembers the config it was started with (`config.json`, never overwritten):
  rerunning into it resumes only under the same config, up to what a resume may change
  (`RESUMABLE_CHANGES`: a longer `num_train_steps`, the logging and checkpoint cadence, ...).
  Every launch appends a line to `launches.jsonl` (its first step and what it changed).

  Args:
    config: a config from `configs/` (see `configs/default.py` for every field).
    workdir: the run directory.
    allow_config_change: continue a workdir's run under a config that differs in other
      fields too (the change is recorded in `launches.jsonl`).

  Returns:
    The summary dict written to `summary.json`.

  Raises:
    ConfigError: a bad config or input, or a config other than the workdir's run, before
      anything is compiled or written.
    FloatingPointError: a non-finite loss or gradient norm (unless skipped by config).
    Preempted: SIGTERM or SIGINT; the checkpoint of the last finished step is written.
    FrozenParametersChanged: a frozen parameter moved (a bug; the run's files stay).
  """
  wall_start = time.time()
  parallel.initialize_distributed(config.multi_host)
  changes = check_config_change(config, workdir, allow_config_change)
  try:
    run = _prepare(config, workdir)
  except (ValueError, KeyError, FileNotFoundError) as e:
    # str() of a KeyError quotes its message; its argument is the message itself.
    raise ConfigError(str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)) from e
  spread, data, stage, plan, state = run.spread, run.data, run.stage, run.plan, run.state
  is_writer = jax.process_index() == 0
  if is_writer:
    _record_launch(workdir, config, plan, state, changes, _data_record(run.train_data, run.evals))
  lr_fn = optim.learning_rate_schedule(config.optimizer, config.num_train_steps)
  skip_nonfinite = bool(config.skip_nonfinite_updates)
  compile_for = functools.partial(
    compile_steps,
    spread,
    label_smoothing=config.label_smoothing,
    learning_rate_fn=lr_fn,
    skip_nonfinite=skip_nonfinite,
  )

  def sources_for(plan, host_state):
    """The model the steps run and their batch sources: with `config.activation_cache` on
    and a frozen, deterministic prefix, the rest of the network on cached prefix outputs."""
    cached = activation_cache.prepare(
      config,
      run.model,
      plan,
      {'params': host_state.params, 'batch_stats': host_state.batch_stats},
      spread,
      workdir,
      train_data=run.train_data,
      eval_data=run.evals,
    )
    if cached is None:
      return run.model, data.train_batches, data.eval_batches
    cached_prefix[plan.name] = cached.start
    logging.info('activation cache: %s runs from %s on cached outputs', plan.name, cached.start)
    return cached.model, cached.train_batches, cached.eval_batches

  cached_prefix = {}
  model, train_source, eval_source = sources_for(plan, state)
  p_train_step, p_eval_step = compile_for(model=model, tx=run.tx, plan=plan)
  rng_train = jax.random.fold_in(jax.random.key(config.seed), 1)
  first_step, last = int(state.step), config.num_train_steps
  state = spread.replicate(state)
  writer = metric_writers.MetricWriter(workdir, enabled=is_writer)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  meta = {'plan': plan.name, 'config': config.to_dict()}
  # Best and early stopping follow the held-out minival split when there is one.
  select = 'minival' if 'minival' in data.eval_batches else 'eval'
  frozen_reference = run.frozen_reference
  stage_flops = {}

  def run_evals(step):
    results = {}
    for name, batches in eval_source.items():
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

  train_batches = parallel.prefetch_to_devices(train_source(first_step), spread)
  window, checked, best, evals_since_best, results, stop = [], 0, None, 0, {}, False
  window_start, window_first, skipped_total = time.time(), first_step + 1, 0
  logging.info('training steps %d..%d under %s', first_step + 1, last, plan.name)
  with _preemption_signals() as received:
    for step in range(first_step + 1, last + 1):
      if stage.end is not None and step > stage.end:  # the next stage of a schedule
        host_params = jax.device_get(spread.unreplicate(state.params))
        _check_frozen(plan, frozen_reference, host_params)
        stage = policies.stage_at(run.stages, step - 1)
        plan, tx = run.setup(stage)
        host_state = jax.device_get(spread.unreplicate(state))
        state = spread.replicate(host_state.replace(opt_state=tx.init(host_state.params)))
        frozen_reference = policies.frozen_checksums(plan, host_params)
        if (
          config.get('activation_cache', 'off') != 'off'
        ):  # each stage caches its own frozen prefix
          model, train_source, eval_source = sources_for(plan, host_state)
          train_batches = parallel.prefetch_to_devices(train_source(step - 1), spread)
        p_train_step, p_eval_step = compile_for(model=model, tx=tx, plan=plan)
        meta['plan'] = plan.name
        logging.info('step %d: stage %s, optimizer state rebuilt', step, plan.name)
        if is_writer:
          _write_plan(workdir, plan, host_params, append=True)
      batch = next(train_batches)
      if plan.name not in stage_flops and config.record_step_flops:
        stage_flops[plan.name] = parallel.compiled_flops(p_train_step, state, batch, rng_train)
      state, metrics = p_train_step(state, batch, rng_train)
      window.append(metrics)
      log = step % config.log_every_steps == 0 or step == last
      evaluate_now = step % config.eval_every_steps == 0 or step == last
      save = step % config.checkpoint_every_steps == 0 or step == last or bool(received)
      if log or save:
        # Nothing non-finite is ever logged as a mean or checkpointed.
        window[checked:] = jax.device_get([spread.unreplicate(m) for m in window[checked:]])
        _check_finite(
          window[checked:], window_first + checked, skip_nonfinite, config.init.checkpoint
        )
        checked = len(window)
      if log:
        means = _mean_metrics(window)
        skipped_total += int(means.get('skipped_steps', 0))
        steps_per_sec = len(window) / (time.time() - window_start)
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
        window, checked, window_start, window_first = [], 0, time.time(), step + 1
      if evaluate_now:
        results = run_evals(step)
        if best is None or results[select]['accuracy'] > best['accuracy']:
          best, evals_since_best = {'accuracy': results[select]['accuracy'], 'step': step}, 0
        else:
          evals_since_best += 1
          stop = 0 < config.early_stopping_patience <= evals_since_best
      if save or stop:
        host_state = jax.device_get(spread.unreplicate(state))
        checkpoint.save(
          ckpt_dir, step, host_state, dict(meta, step=step), max_to_keep=config.keep_checkpoints
        )
      if received:
        writer.close()
        raise Preempted(step, received[0])
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
  steps_run = int(jax.device_get(spread.unreplicate(state.step))) - first_step
  if steps_run and skipped_total == steps_run:
    raise FloatingPointError(
      f'every one of the {steps_run} steps of this run was skipped as non-finite '
      '(skip_nonfinite_updates): nothing was trained; '
      + (
        f'the weights loaded from init.checkpoint={config.init.checkpoint} are the likely cause'
        if config.init.checkpoint
        else 'check the data and the learning rate'
      )
    )
  final_params = jax.device_get(spread.unreplicate(state.params))
  frozen_final = _check_frozen(plan, frozen_reference, final_params)
  n_trainable, n_total = policies.trainable_count(plan, final_params)
  summary = {
    'plan': run.plan_label,
    'steps': int(jax.device_get(spread.unreplicate(state.step))),
    'final_eval_accuracy': results['eval']['accuracy'],
    'final_eval_loss': results['eval']['loss'],
    'eval_examples': results['eval']['count'],
    **({'final_minival_accuracy': results['minival']['accuracy']} if 'minival' in results else {}),
    f'best_{select}_accuracy': best and best['accuracy'],
    f'best_{select}_step': best and best['step'],
    'stopped_early': stop,
    'skipped_steps': skipped_total,
    # The last stage's plan: its trainable count and its compiled step's FLOPs (XLA).
    'trainable_parameters': n_trainable,
    'total_parameters': n_total,
    'trainable_percent': 100.0 * n_trainable / n_total,
    **({'train_step_flops': stage_flops[plan.name]} if plan.name in stage_flops else {}),
    **({'stages': _stage_summary(run.stages, config, stage_flops)} if len(run.stages) > 1 else {}),
    # Plans whose steps ran on cached prefix outputs, with the first block they ran.
    **({'activation_cache': cached_prefix} if cached_prefix else {}),
    # Frozen leaves checked bit for bit against the loaded values (sha256 per leaf).
    'frozen_leaves': len(frozen_final),
    'frozen_checksum': policies.combined_checksum(frozen_final),
    'frozen_unchanged': True,
    'wall_time_sec': time.time() - wall_start,
  }
  if is_writer:
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=2)
  return summary


def _check_frozen(plan: policies.Plan, reference: dict, params: PyTree) -> dict[str, str]:
  """The frozen leaves' checksums; raises if any differs from `reference`."""
  final = policies.frozen_checksums(plan, params)
  moved = sorted(p for p in reference if p in final and reference[p] != final[p])
  if moved:
    raise FrozenParametersChanged(
      f'frozen parameters differ from their loaded values: {", ".join(moved)}'
    )
  return final


def _stage_summary(stages: list, config: Any, stage_flops: dict) -> list[dict]:
  rows = []
  for s in stages:
    name = s.label(str(s.expression))  # the stage's plan name
    end = s.end if s.end is not None else config.num_train_steps
    rows.append({'plan': name, 'first_step': s.start + 1, 'last_step': end})
    if name in stage_flops:
      rows[-1]['train_step_flops'] = stage_flops[name]
  return rows


CONFIG_FILE = 'config.json'  # the config a workdir's run was started with
PLAN_FILE = 'plan.txt'  # the audit table of each stage's plan, as it ran
DATA_FILE = 'data.json'  # each split's classes and per-class counts, as first read
LAUNCHES_FILE = 'launches.jsonl'  # one line per launch: first step, config changes
# Fields a resume may change without changing what the run computes up to now (or, for
# `num_train_steps`, only extending it). Anything else is another experiment.
RESUMABLE_CHANGES = (
  'num_train_steps',
  'log_every_steps',
  'eval_every_steps',
  'checkpoint_every_steps',
  'keep_checkpoints',
  'early_stopping_patience',
  'record_step_flops',
  'parallelism',
  'multi_host',
  'eval_batch_size',
  'activation_cache',
  'activation_cache_memory_mb',
  'dataset.data_dir',
  'dataset.local_dir',
  'dataset.download',
)


def _flat_config(tree: dict, prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flat_config(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def _workdir_config(workdir: str) -> dict | None:
  """The config the workdir's run last launched with (its latest recorded change, else
  `config.json`), or None for a new workdir."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    reference = json.load(f)
  launches = os.path.join(workdir, LAUNCHES_FILE)
  if os.path.exists(launches):
    with open(launches) as f:
      for line in f:
        record = json.loads(line) if line.strip() else {}
        reference = record.get('config', reference)
  return reference


def check_config_change(config: Any, workdir: str, allow: bool) -> dict[str, list]:
  """The fields in which `config` differs from the workdir's run, `{field: [old, new]}`.

  Fields ftlab added or removed since the run started are not differences.

  Raises:
    ConfigError: a difference a resume may not make (see `RESUMABLE_CHANGES`; a shorter
      `num_train_steps` among them), unless `allow`.
  """
  reference = _workdir_config(workdir)
  if reference is None:
    return {}
  old = _flat_config(reference)
  new = _flat_config(json.loads(config.to_json_best_effort()))
  changes = {k: [old[k], new[k]] for k in sorted(old.keys() & new.keys()) if old[k] != new[k]}
  refused = {
    k: v
    for k, v in changes.items()
    if k not in RESUMABLE_CHANGES or (k == 'num_train_steps' and v[1] < v[0])
  }
  if refused and not allow:
    listed = ', '.join(f'{k}={v[1]!r} (was {v[0]!r})' for k, v in refused.items())
    raise ConfigError(
      f'{workdir} holds a run started with another config: {listed}; resuming it under this '
      'one would mix two experiments in one record. Use a new --workdir, or pass '
      '--allow_config_change to continue this run under the new config (recorded in '
      f'{LAUNCHES_FILE})'
    )
  if changes:
    logging.warning('config changes since the last launch: %s', changes)
  return changes


def _data_record(train_data: Any, evals: dict[str, Any]) -> dict:
  """Each split's classes and counts (and an image folder's ignored files), logged."""
  record = {'train': train_data.describe(), **{k: d.describe() for k, d in evals.items()}}
  for name, found in record.items():
    counts = found['class_counts']
    classes = (
      ', '.join(f'{c} {n}' for c, n in counts.items()) if counts else ', '.join(found['classes'])
    )
    logging.info(
      'data %s (%s): %d examples, %d classes: %s',
      name,
      found['split'],
      found['examples'],
      len(found['classes']),
      classes,
    )
    if found.get('ignored_files'):
      logging.info('  ignored in the image folder: %s', ', '.join(found['ignored_files']))
    if found.get('rotated_photos'):
      logging.info('  %d photos turned upright by their EXIF orientation', found['rotated_photos'])
  return record


def _record_launch(
  workdir: str, config: Any, plan: policies.Plan, state: Any, changes: dict, data: dict
) -> None:
  """config.json, plan.txt and data.json on the first launch (never rewritten: they record
  what ran); a line in launches.jsonl on every launch."""
  os.makedirs(workdir, exist_ok=True)
  if not os.path.exists(os.path.join(workdir, CONFIG_FILE)):
    with open(os.path.join(workdir, CONFIG_FILE), 'w') as f:
      f.write(config.to_json_best_effort(indent=2) + '\n')
  if not os.path.exists(os.path.join(workdir, PLAN_FILE)):
    _write_plan(workdir, plan, state.params)
  data_path = os.path.join(workdir, DATA_FILE)
  if not os.path.exists(data_path):
    with open(data_path, 'w') as f:
      json.dump(data, f, indent=2)
  else:
    with open(data_path) as f:
      if json.load(f) != json.loads(json.dumps(data)):
        logging.warning('the data differ from what %s recorded at the first launch', data_path)
  record = {
    'time': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
    'first_step': int(state.step),
    'processes': jax.process_count(),
    'devices': jax.device_count(),
  }
  if changes:
    record.update(changes=changes, config=json.loads(config.to_json_best_effort()))
  with open(os.path.join(workdir, LAUNCHES_FILE), 'a') as f:
    f.write(json.dumps(record) + '\n')


def _write_plan(workdir: str, plan: policies.Plan, params: PyTree, append: bool = False) -> None:
  """plan.txt: the audit table (a new stage's table is appended)."""
  table = policies.audit_table(plan, params)
  with open(os.path.join(workdir, PLAN_FILE), 'a' if append else 'w') as f:
    f.write(('\n' if append else '') + table + '\n')
  logging.info('\n%s', table)


def datasets(config: Any) -> tuple[Any, dict[str, Any]]:
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


def check_plans(config: Any, num_classes: int) -> tuple[nn.Module, list[policies.Stage]]:
  """The model and the stages of its plan, with every stage's plan and optimizer built on
  parameter shapes: a check of the config's model, policy and optimizer that reads no data
  and computes nothing.

  Raises:
    ValueError: a bad model, policy or optimizer setting, in one line.
  """
  model = build_model(config.model, num_classes)
  structure = model.block_structure()
  size = config.dataset.image_size
  shapes = jax.eval_shape(
    functools.partial(model.init, train=False), jax.random.key(0), jnp.zeros((1, size, size, 3))
  )
  stages = policies.plan_stages(structure, config.policy, config.num_train_steps)
  shaped_plans = []
  for stage in stages:
    shaped = policies.make_plan(shapes['params'], structure, config.policy, stage=stage)
    optim.make(shaped, config.optimizer, config.num_train_steps, anchor=shapes['params'])
    shaped_plans.append(shaped)
  activation_cache.check_config(config, model, shaped_plans)
  return model, stages


def _prepare(config: Any, workdir: str) -> types.SimpleNamespace:
  """Everything up to the first compile: every config or input error surfaces here."""
  spread = parallel.Spread(config.parallelism)
  parallel.check_divisible(config.batch_size, jax.device_count())
  parallel.check_divisible(config.eval_batch_size, jax.device_count())
  policies.check_policy_name(config.policy.name, config.policy)
  train_data, evals = datasets(config)
  model, stages = check_plans(config, train_data.num_classes)
  structure = model.block_structure()
  rng_init = jax.random.fold_in(jax.random.key(config.seed), 0)
  size = config.dataset.image_size
  pipeline = dict(
    image_size=size,
    preprocess=config.dataset.preprocess,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  data = types.SimpleNamespace(
    train_batches=lambda start_step, augment=config.dataset.augment: input_pipeline.train_iterator(
      train_data,
      global_batch=config.batch_size,
      augment=augment,
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
    train_once=functools.partial(
      input_pipeline.eval_iterator, train_data, global_batch=config.batch_size, **pipeline
    ),
  )
  variables = init_variables(model, size, rng_init, config.init)
  anchor = policies.flatten(variables['params'])
  fisher_fn = functools.partial(_fisher, config, spread, model, structure, variables, data)
  setups = {}

  def setup(stage: policies.Stage) -> tuple[policies.Plan, Any]:
    """The stage's plan (per-element masks chosen on the loaded weights) and optimizer."""
    if stage.index not in setups:
      plan = policies.make_plan(
        variables['params'], structure, config.policy, stage=stage, fisher_fn=fisher_fn
      )
      tx = optim.make(
        plan,
        config.optimizer,
        config.num_train_steps,
        first_step=stage.start,
        anchor=anchor,
        seed=config.seed,
      )
      setups[stage.index] = plan, tx
    return setups[stage.index]

  ckpt_dir = os.path.join(workdir, 'checkpoints')
  stage = stages[0]
  plan, tx = setup(stage)
  state = create_train_state(variables, tx)
  frozen_reference = policies.frozen_checksums(plan, state.params)
  if checkpoint.latest_step(ckpt_dir) is not None:
    state, stage, plan_changed = _resume(ckpt_dir, variables, stages, setup)
    plan, tx = setup(stage)
    reference_params = state.params if plan_changed else variables['params']
    # A stage freezes what it starts from; a plain resume checks against the loaded values.
    frozen_reference = policies.frozen_checksums(plan, reference_params)
  expression = policies.check_policy_name(config.policy.name, config.policy)
  return types.SimpleNamespace(
    spread=spread,
    model=model,
    stages=stages,
    stage=stage,
    setup=setup,
    plan=plan,
    tx=tx,
    state=state,
    data=data,
    train_data=train_data,
    evals=evals,
    frozen_reference=frozen_reference,
    plan_label=plan.name if len(stages) == 1 else str(expression),
  )


def _fisher(
  config: Any,
  spread: Any,
  model: nn.Module,
  structure: vgg.BlockStructure,
  variables: PyTree,
  data: Any,
  num_batches: int | None,
) -> dict[str, np.ndarray]:
  """Mean squared per-example gradient of every leaf a plan could train (the empirical
  Fisher's diagonal): over `num_batches` shuffled training batches without augmentation,
  or over every training example once when None."""
  scope = policies.make_plan(jax.eval_shape(lambda: variables['params']), structure, config.policy)
  per_device = config.batch_size // jax.device_count()
  chunk = max(c for c in range(1, 9) if per_device % c == 0)
  p_fisher = spread.compile(
    functools.partial(
      fisher_step,
      model=bind_model(model, scope),
      trainable_mask=scope.trainable_mask,
      chunk=chunk,
    ),
    in_kinds=(parallel.REPLICATED, parallel.SHARDED),
  )
  state = spread.replicate(
    TrainState(
      step=jnp.zeros((), jnp.int32),
      params=variables['params'],
      batch_stats=variables.get('batch_stats', {}),
      opt_state=(),
    )
  )
  if num_batches is None:
    batches = data.train_once()
  else:
    batches = itertools.islice(data.train_batches(0, augment='none'), num_batches)
  totals = None
  for batch in batches:
    sums = p_fisher(state, spread.shard(batch))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(spread.unreplicate(totals))
  count = max(float(totals['count']), 1.0)
  flat = policies.flatten(totals['squared_grads'])
  logging.info('Fisher information from %d examples over %d leaves', count, len(flat))
  return {p: np.asarray(v) / count for p, v in flat.items()}


def _resume(
  ckpt_dir: str, variables: PyTree, stages: list, setup: Callable
) -> tuple[TrainState, policies.Stage, bool]:
  """The newest readable checkpoint, its stage, and whether the plan changed since it was
  written.

  Under the same plan the whole state is restored; under a changed plan (a new stage) only
  the parameters, statistics and step, and the optimizer state starts afresh. A damaged
  newest checkpoint is moved aside (`damaged-<step>`), with a warning, and the previous
  one is used; nothing is deleted.
  """
  damaged = []
  for step in reversed(checkpoint.all_steps(ckpt_dir)):
    stage = policies.stage_at(stages, step)
    plan, tx = setup(stage)
    try:
      restored, plan_changed = _restore_step(
        ckpt_dir, step, create_train_state(variables, tx), plan, tx
      )
    except checkpoint.MismatchError:  # another model or optimizer: a config problem
      raise
    except ValueError as e:
      damaged.append((step, e))
    except Exception as e:  # noqa: BLE001 (Orbax and TensorStore raise many kinds)
      damaged.append((step, e))
    else:
      for bad_step, error in damaged:
        logging.warning(
          'checkpoint step %d is damaged (%s: %s); resuming from step %d instead; '
          'moved to damaged-%d',
          bad_step,
          type(error).__name__,
          str(error).splitlines()[0][:200],
          step,
          bad_step,
        )
        if jax.process_index() == 0:
          os.rename(
            os.path.join(ckpt_dir, str(bad_step)), os.path.join(ckpt_dir, f'damaged-{bad_step}')
          )
      return restored, stage, plan_changed
  raise ValueError(
    f'no readable checkpoint in {ckpt_dir}; damaged steps: '
    + ', '.join(f'{s} ({type(e).__name__})' for s, e in damaged)
  )


def _restore_step(
  ckpt_dir: str, step: int, state: TrainState, plan: policies.Plan, tx: Any
) -> tuple[TrainState, bool]:
  meta = checkpoint.restore_meta(ckpt_dir, step)
  if meta.get('plan') == plan.name:
    restored, _ = checkpoint.restore(ckpt_dir, state, step)
    logging.info('resumed from step %d', step)
    return restored, False
  # A new stage: parameters carry over, the optimizer state is rebuilt for the new plan.
  logging.info(
    'plan changed from %s to %s at step %d: optimizer state rebuilt',
    meta.get('plan'),
    plan.name,
    step,
  )
  params = checkpoint.load_params(ckpt_dir, state.params, step=step)
  stats = state.batch_stats
  if stats:
    stats = checkpoint.load_params(ckpt_dir, stats, key='batch_stats', step=step)
  return state.replace(
    step=jnp.asarray(step, jnp.int32),
    params=params,
    batch_stats=stats,
    opt_state=tx.init(params),
  ), True
