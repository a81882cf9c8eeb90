"""The run loop: steps, evals, early stopping, checkpoints, preemption, the summary.

`train_and_evaluate(config, workdir)` is what `python -m ftlab.main` runs. Everything that
can be wrong with a config or its inputs is found by `ftlab.run.make_run`, before anything
is compiled or written, and raised as a `ConfigError` (exit code 2 on the command line).
"""

from __future__ import annotations

import dataclasses
import signal
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
from absl import logging

from ftlab import parallel, train
from ftlab.evals import fewshot
from ftlab.files import checkpoint, metric_writers, workdir
from ftlab.plans import optim, policies
from ftlab.run import ConfigError, Run, build_model, cached_sources, make_run
from ftlab.train import TrainState, compile_ema_state, compile_steps, evaluate

__all__ = [
  'ConfigError',
  'FrozenParametersChanged',
  'Preempted',
  'build_model',
  'train_and_evaluate',
]


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


def is_time(step: int, every: int, last: int) -> bool:
  """Whether `step` is on an `every`-step cadence, or the run's last step."""
  return step % every == 0 or step == last


@dataclasses.dataclass
class _Stage:
  """What runs one stage: its plan, compiled steps, batches and frozen reference."""

  plan: policies.Plan
  end: int | None  # the stage's last step (None: the run's)
  p_train_step: Callable
  p_eval_step: Callable
  p_ema_state: Callable | None  # the state with its EMA as parameters (None: no EMA)
  train_batches: Iterator
  eval_sources: dict[str, Callable[[], Iterator]]
  frozen_reference: dict[str, str]
  cached_from: str | None
  p_features: Callable | None  # the few-shot probe's features (None: no probe)
  probe_batches: dict | None  # the probe's splits as cached prefix outputs (None: images)


def _enter(run: Run, stage: policies.Stage, host: TrainState, reference: dict, step: int):
  """The stage starting after `step` from the host state `host`, its steps compiled."""
  plan, tx = run.setup(stage)
  cached, config = cached_sources(run, plan, host), run.config
  model, train_source, eval_sources = run.model, run.data.train_batches, run.data.eval_sources()
  if cached:
    logging.info('activation cache: %s runs from %s on cached outputs', plan.name, cached.start)
    model, train_source, eval_sources = cached.model, cached.train_batches, cached.eval_batches
  p_features, probe_batches = None, None
  if run.fewshot:  # its features from the cached prefix outputs when its layer comes later
    on_cache = cached and fewshot.runs_after(model, run.fewshot.layer, cached.start)
    p_features = fewshot.compile_features(
      model if on_cache else run.model, run.fewshot.layer, run.spread
    )
    probe_batches = cached.extra_batches if on_cache else None
  p_train_step, p_eval_step = compile_steps(
    run.spread,
    model=model,
    tx=tx,
    plan=plan,
    label_smoothing=config.label_smoothing,
    learning_rate_fn=optim.learning_rate_schedule(config.optimizer, config.num_train_steps),
    skip_nonfinite=bool(config.skip_nonfinite_updates),
    accum_steps=config.get('accum_steps', 1),
    ema_decay=config.get('ema_decay', 0.0),
  )
  p_ema_state = compile_ema_state(run.spread, plan) if config.get('ema_decay', 0.0) else None
  train_batches = parallel.prefetch_to_devices(train_source(step), run.spread)
  return _Stage(
    plan,
    stage.end,
    p_train_step,
    p_eval_step,
    p_ema_state,
    train_batches,
    eval_sources,
    reference,
    cached and cached.start,
    p_features,
    probe_batches,
  )


def _next_stage(run: Run, current: _Stage, state: TrainState, step: int):
  """At a stage boundary: the frozen check of the stage ending, the next stage's plan, and
  the state with its parameters kept and its optimizer state rebuilt for the new plan."""
  host = jax.device_get(run.spread.unreplicate(state))
  _check_frozen(current.plan, current.frozen_reference, host.params)
  stage = policies.stage_at(run.stages, step - 1)
  plan, tx = run.setup(stage)
  # The EMA, like the optimizer state, restarts from the current weights for the new plan.
  ema = train.init_ema(host.params, train.ema_entries(plan)) if host.ema else {}
  host = host.replace(opt_state=tx.init(host.params), ema=ema)
  following = _enter(run, stage, host, policies.frozen_checksums(plan, host.params), step - 1)
  logging.info('step %d: stage %s, optimizer state rebuilt', step, plan.name)
  if jax.process_index() == 0:
    workdir.write_plan(run.workdir, policies.audit_table(plan, host.params), append=True)
  return following, run.spread.replicate(host)


class _Window:
  """The train metrics of the steps since the last log: checked for non-finite values before
  anything is logged or checkpointed, then averaged over the applied steps."""

  def __init__(self, first_step: int, spread: Any, config: Any):
    self.spread, self.config = spread, config
    self.skip_nonfinite = bool(config.skip_nonfinite_updates)
    self.skipped_total = 0
    self._reset(first_step)

  def _reset(self, first_step: int) -> None:
    self.pending, self.checked, self.first, self.start = [], 0, first_step, time.time()

  def add(self, metrics: dict) -> None:
    self.pending.append(metrics)

  def check(self) -> None:
    unchecked = [self.spread.unreplicate(m) for m in self.pending[self.checked :]]
    self.pending[self.checked :] = jax.device_get(unchecked)
    _check_finite(
      self.pending[self.checked :],
      self.first + self.checked,
      self.skip_nonfinite,
      self.config.init.checkpoint,
    )
    self.checked = len(self.pending)

  def log(self, step: int, last: int, writer: metric_writers.MetricWriter) -> None:
    """Writes and logs the window's means (and examples/s); a new window starts."""
    applied = [m for m in self.pending if not m.get('skipped')] or self.pending
    means = {k: float(np.mean([m[k] for m in applied])) for k in self.pending[0] if k != 'skipped'}
    if 'skipped' in self.pending[0]:
      means['skipped_steps'] = float(sum(m['skipped'] for m in self.pending))
      self.skipped_total += int(means['skipped_steps'])
    steps_per_sec = len(self.pending) / (time.time() - self.start)
    means['examples_per_sec'] = steps_per_sec * self.config.batch_size
    self._reset(step + 1)
    writer.write(step, {f'train/{k}': v for k, v in means.items()})
    eta = (last - step) / steps_per_sec
    logging.info('step %d/%d: loss %.4f, accuracy %.4f, %.2f steps/s, ETA %.0f s', step, last,
                 means['loss'], means['accuracy'], steps_per_sec, eta)  # fmt: skip


class _Best:
  """The best held-out accuracy so far, and early stopping after `patience` evals without."""

  def __init__(self, patience: int):
    self.patience, self.accuracy, self.step, self.since = patience, None, None, 0

  def update(self, step: int, accuracy: float) -> bool:
    """Records an eval; True when the run should stop early."""
    if self.accuracy is None or accuracy > self.accuracy:
      self.accuracy, self.step, self.since = accuracy, step, 0
      return False
    self.since += 1
    return 0 < self.patience <= self.since


def train_and_evaluate(config: Any, directory: str, *, allow_config_change: bool = False) -> dict:
  """Trains and evaluates as `config` says, resuming from `directory` if it holds a checkpoint.

  Writes (process 0) the workdir's record (`ftlab.files.workdir`), metrics, TensorBoard events and
  `summary.json`; every process takes part in `checkpoints/`. A multi-stage plan compiles one
  step per stage; at a boundary the parameters carry over and the optimizer state is rebuilt.
  A rerun resumes only under the config the run started with, up to what a resume may change
  (`workdir.RESUMABLE_CHANGES`), unless `allow_config_change`.

  Returns:
    The summary dict written to `summary.json`.

  Raises:
    ConfigError: a bad config or input, or another config than the workdir's run, before
      anything is compiled or written.
    FloatingPointError: a non-finite loss or gradient norm (unless skipped by config), or a
      run whose every update was skipped.
    Preempted: SIGTERM or SIGINT; the checkpoint of the last finished step is written.
    FrozenParametersChanged: a frozen parameter moved (a bug; the run's files stay).
  """
  wall_start = time.time()
  run = make_run(config, directory, allow_config_change=allow_config_change)
  spread, is_writer = run.spread, jax.process_index() == 0
  first, last = int(run.state.step), config.num_train_steps
  if is_writer:
    _record_launch(run)
  current = _enter(run, run.stage, run.state, run.frozen_reference, first)
  stages = [current]
  state, rng = spread.replicate(run.state), jax.random.fold_in(jax.random.key(config.seed), 1)
  writer = metric_writers.MetricWriter(
    run.workdir.metrics, run.workdir.tensorboard, enabled=is_writer
  )
  window, best = _Window(first + 1, spread, config), _Best(config.early_stopping_patience)
  stop, results, flops = False, {}, {}
  p_predict = _start_drift(run)

  def run_evals(step):
    return _evals(run, current, state, step, writer, p_predict)

  logging.info('training steps %d..%d under %s', first + 1, last, current.plan.name)
  with parallel.PreemptionNotice() as notice:
    for step in range(first + 1, last + 1):
      if current.end is not None and step > current.end:  # the next stage of a schedule
        current, state = _next_stage(run, current, state, step)
        stages.append(current)
      state = run.remask(current.plan, state, step - 1)  # a dynamic mask's next one, if due
      batch = next(current.train_batches)
      if config.record_step_flops and current.plan.name not in flops:
        flops[current.plan.name] = parallel.compiled_flops(current.p_train_step, state, batch, rng)
      state, metrics = current.p_train_step(state, batch, rng)
      window.add(metrics)
      preempted = notice.reached(step)  # the same answer on every process
      log = is_time(step, config.log_every_steps, last)
      save = is_time(step, config.checkpoint_every_steps, last) or bool(preempted)
      if log or save:  # nothing non-finite is ever logged as a mean or checkpointed
        window.check()
      if log:
        window.log(step, last, writer)
      if is_time(step, config.eval_every_steps, last):
        results = run_evals(step)
        stop = best.update(step, results[run.data.held_out]['accuracy'])
      if save or stop:
        _save(run, state, current.plan, step)
      if preempted:
        writer.close()
        raise Preempted(step, preempted)
      if stop:
        logging.info('early stop at step %d: %d evals without a better %s accuracy', step,
                     best.since, run.data.held_out)  # fmt: skip
        break
  if not results:  # resumed at the end: evaluate what was restored
    results = run_evals(first)
  writer.close()
  final = jax.device_get(spread.unreplicate(state))
  _check_all_skipped(config, int(final.step) - first, window.skipped_total)
  frozen = _check_frozen(current.plan, current.frozen_reference, final.params)
  summary = _summary(run, final, stages, results, best, stop, window, flops, frozen)
  summary['wall_time_sec'] = time.time() - wall_start
  if is_writer:
    workdir.write_summary(run.workdir, summary)
  return summary


def _start_drift(run: Run) -> Callable | None:
  """The forgetting measure's compiled step, its reference (the loaded model's own
  predictions) recorded; None without `config.evals.forgetting`."""
  if not run.drift:
    return None
  p_predict = run.drift.compile(run.model, run.spread)
  variables = run.variables
  loaded = TrainState(0, variables['params'], variables.get('batch_stats', {}), ())
  run.drift.start(p_predict, run.spread.replicate(loaded), run.spread)
  return p_predict


def _evals(run: Run, current: _Stage, state: TrainState, step: int, writer, p_predict) -> dict:
  """Every eval at `step`, written and logged: loss and accuracy of each split (and of the
  EMA weights), the source head's agreement, the few-shot probe."""
  spread, drift, probe = run.spread, run.drift, run.fewshot
  found = {
    n: evaluate(current.p_eval_step, state, spread, b()) for n, b in current.eval_sources.items()
  }
  for name, metrics in found.items():
    writer.write(step, {f'{name}/{k}': v for k, v in metrics.items()})
    logging.info('step %d: %s accuracy %.4f on %d examples', step, name, metrics['accuracy'],
                 metrics['count'])  # fmt: skip
  if current.p_ema_state:  # the averaged weights on the same splits
    averaged = current.p_ema_state(state)
    for name, batches in current.eval_sources.items():
      metrics = evaluate(current.p_eval_step, averaged, spread, batches())
      found[name].update(ema_accuracy=metrics['accuracy'], ema_loss=metrics['loss'])
      writer.write(
        step, {f'{name}/ema_accuracy': metrics['accuracy'], f'{name}/ema_loss': metrics['loss']}
      )
      logging.info('step %d: %s EMA accuracy %.4f', step, name, metrics['accuracy'])
  if drift:
    found['forgetting'] = drift.agreement(p_predict, state, spread)
    writer.write(step, {'forgetting/agreement': found['forgetting']['agreement']})
    logging.info('step %d: source head agreement %.4f', step, found['forgetting']['agreement'])
  if probe:
    found['fewshot'] = probe.evaluate(current.p_features, state, spread, current.probe_batches)
    writer.write(step, {f'fewshot/{k}': v for k, v in found['fewshot'].items()})
    logging.info('step %d: few-shot probe (%s) %s', step, probe.layer, found['fewshot'])
  return found


def _save(run: Run, state: TrainState, plan: policies.Plan, step: int) -> None:
  """Checkpoint `step`: the whole train state, with the plan and config in its meta."""
  host_state = jax.device_get(run.spread.unreplicate(state))
  meta = {'plan': plan.name, 'config': run.config.to_dict(), 'step': step}
  checkpoint.save(
    run.workdir.checkpoints, step, host_state, meta, max_to_keep=run.config.keep_checkpoints
  )


def _record_launch(run: Run) -> None:
  """The workdir's record of this launch (`ftlab.files.workdir.record_launch`), data logged."""
  data = run.data.describe()
  workdir.log_data(data)
  plan, _ = run.setup(run.stage)
  workdir.record_launch(
    run.workdir,
    run.config,
    policies.audit_table(plan, run.state.params),
    int(run.state.step),
    run.changes,
    data,
    processes=jax.process_count(),
    devices=jax.device_count(),
  )


def _summary(run, final, stages, results, best, stop, window, flops, frozen) -> dict:
  """`summary.json` but for the wall time."""
  select, plan = run.data.held_out, stages[-1].plan
  cached = {s.plan.name: s.cached_from for s in stages if s.cached_from}
  n_trainable, n_total = policies.trainable_count(plan, final.params)
  summary = {
    'plan': run.plan_label,
    'steps': int(final.step),
    'final_eval_accuracy': results['eval']['accuracy'],
    'final_eval_loss': results['eval']['loss'],
    'eval_examples': results['eval']['count'],
    **({'final_minival_accuracy': results['minival']['accuracy']} if 'minival' in results else {}),
    **({'final_fewshot': results['fewshot']} if 'fewshot' in results else {}),
    **(
      {'final_source_agreement': results['forgetting']['agreement']}
      if 'forgetting' in results
      else {}
    ),
    **(
      {'final_ema_eval_accuracy': results['eval']['ema_accuracy']}
      if 'ema_accuracy' in results['eval']
      else {}
    ),
    f'best_{select}_accuracy': best.accuracy,
    f'best_{select}_step': best.step,
    'stopped_early': stop,
    'skipped_steps': window.skipped_total,
    # The last stage's plan: its trainable count and its compiled step's FLOPs (XLA).
    'trainable_parameters': n_trainable,
    'total_parameters': n_total,
    'trainable_percent': 100.0 * n_trainable / n_total,
    'init': run.init.summary() if run.init else {},
    **({'train_step_flops': flops[plan.name]} if plan.name in flops else {}),
  }
  if len(run.stages) > 1:
    summary['stages'] = _stage_summary(run, flops)
  if cached:  # plans whose steps ran on cached prefix outputs, with the first block they ran
    summary['activation_cache'] = cached
  # Frozen leaves checked bit for bit against the loaded values (sha256 per leaf).
  summary.update(
    frozen_leaves=len(frozen),
    frozen_checksum=policies.combined_checksum(frozen),
    frozen_unchanged=True,
  )
  return summary


def _stage_summary(run: Run, flops: dict) -> list[dict]:
  rows = []
  for s in run.stages:
    name = s.label(str(s.expression))  # the stage's plan name
    end = s.end if s.end is not None else run.config.num_train_steps
    rows.append({'plan': name, 'first_step': s.start + 1, 'last_step': end})
    if name in flops:
      rows[-1]['train_step_flops'] = flops[name]
  return rows


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


def _check_all_skipped(config: Any, steps_run: int, skipped: int) -> None:
  """Raises FloatingPointError when every step of this launch was skipped as non-finite."""
  if steps_run and skipped == steps_run:
    init = config.init.checkpoint
    raise FloatingPointError(
      f'every one of the {steps_run} steps of this run was skipped as non-finite '
      '(skip_nonfinite_updates): nothing was trained; '
      + (
        f'the weights loaded from init.checkpoint={init} are the likely cause'
        if init
        else 'check the data and the learning rate'
      )
    )


def _check_frozen(plan: policies.Plan, reference: dict, params: Any) -> dict[str, str]:
  """The frozen leaves' checksums; raises if any differs from `reference`."""
  final = policies.frozen_checksums(plan, params)
  moved = sorted(p for p in reference if p in final and reference[p] != final[p])
  if moved:
    raise FrozenParametersChanged(
      f'frozen parameters differ from their loaded values: {", ".join(moved)}'
    )
  return final
