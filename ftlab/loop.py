"""The run loop: steps, evals, early stopping, checkpoints, preemption, the summary.

`train_and_evaluate(config, workdir)` is what `python -m ftlab.main` runs. Everything that
can be wrong with a config or its inputs is found by `ftlab.run.make_run`, before anything
is compiled or written, and raised as an `InputError` (exit code 2 on the command line). The
loop runs the evaluators it is given (`ftlab.evals`) and names none of them.
"""

from __future__ import annotations

import dataclasses
import signal
import tempfile
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
from absl import logging

import ftlab
from ftlab import ema, parallel
from ftlab.evals.base import StageView
from ftlab.files import checkpoint, metric_writers, workdir
from ftlab.plans import optim, policies
from ftlab.run import Run, StagePlan, cached_sources, make_run
from ftlab.train import TrainState, compile_steps

__all__ = ['FrozenParametersChanged', 'Preempted', 'train_and_evaluate']


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
  """What runs one stage: its plan, compiled train step, batches and frozen reference."""

  plan: policies.Plan
  end: int | None  # the stage's last step (None: the run's)
  p_train_step: Callable
  train_batches: Iterator
  frozen_reference: dict[str, str]
  cached_from: str | None


def _enter(run: Run, at: StagePlan, host: TrainState, reference: dict, step: int) -> _Stage:
  """The stage starting after `step` from the host state `host`, its steps compiled and the
  evaluators compiled for it."""
  plan, config = at.plan, run.config
  cached = cached_sources(run, plan, host)
  model, train_source = run.model, run.data.train_batches
  view = StageView(plan, model, run.data.eval_sources())
  # A cached stage swaps in the model from its first uncached block and batches of prefix
  # outputs; the evaluators must see the same swap, or they would feed images to a model that
  # expects activations.
  if cached:
    logging.info('activation cache: %s runs from %s on cached outputs', plan.name, cached.start)
    model, train_source = cached.model, cached.train_batches
    view = StageView(plan, model, cached.eval_batches, cached.start, cached.extra_batches)
  for evaluator in run.evaluators:
    evaluator.start_stage(view)
  p_train_step, _ = compile_steps(
    run.spread,
    model=model,
    tx=at.tx,
    plan=plan,
    label_smoothing=config.label_smoothing,
    learning_rate_fn=optim.learning_rate_schedule(config.optimizer, config.num_train_steps),
    skip_nonfinite=bool(config.skip_nonfinite_updates),
    accum_steps=config.get('accum_steps', 1),
    ema_decay=config.get('ema_decay', 0.0),
  )
  # The iterator starts at `step`, so a resumed run (or a later stage) sees the batches the
  # uninterrupted run would have seen from there.
  train_batches = parallel.prefetch_to_devices(train_source(step), run.spread)
  return _Stage(plan, at.stage.end, p_train_step, train_batches, reference, cached and cached.start)


def _restart(at: StagePlan, host: TrainState) -> TrainState:
  """`host` as stage `at` starts it: its parameters kept, its optimizer state built afresh
  for the stage's plan and the EMA, like the optimizer state, restarted from the current
  weights."""
  averaged = ema.init(host.params, ema.entries(at.plan)) if host.ema else {}
  return host.replace(opt_state=at.tx.init(host.params), ema=averaged)


def _next_stage(run: Run, current: _Stage, state: TrainState, step: int):
  """At a stage boundary: the frozen check of the stage ending, the next stage's plan, and
  the state with its parameters kept and its optimizer state rebuilt for the new plan."""
  # On the host: the new plan's optimizer state is built from scratch there, and the old
  # stage's frozen leaves are checked against its reference before anything moves.
  host = jax.device_get(run.spread.unreplicate(state))
  _check_frozen(current.plan, current.frozen_reference, host.params)
  # `step` is the first step of the new stage, so `step - 1` steps are done.
  at = run.stage_at(step - 1)
  host = _restart(at, host)
  # The new stage's frozen reference is what it starts from, not the loaded weights: a leaf
  # the previous stage trained may be frozen from here on.
  following = _enter(run, at, host, policies.frozen_checksums(at.plan, host.params), step - 1)
  logging.info('step %d: stage %s, optimizer state rebuilt', step, at.plan.name)
  if jax.process_index() == 0:
    workdir.write_plan(run.workdir, policies.audit_table(at.plan, host.params), append=True)
  return following, run.spread.replicate(host)


class _Window:
  """The train metrics of the steps since the last log: checked for non-finite values before
  anything is logged or checkpointed, then averaged over the applied steps."""

  def __init__(self, first_step: int, spread: Any, config: Any):
    self.spread, self.config = spread, config
    self.skip_nonfinite = bool(config.skip_nonfinite_updates)
    self.skipped_total = 0
    self.seconds_per_step = []  # one entry per log window
    self._reset(first_step)

  def _reset(self, first_step: int) -> None:
    self.pending, self.checked, self.first, self.start = [], 0, first_step, time.time()

  def add(self, metrics: dict) -> None:
    self.pending.append(metrics)

  def restart_clock(self) -> None:
    """After an evaluation or a checkpoint: the window's time counts train steps only."""
    self.start = time.time()

  def step_time(self) -> float | None:
    """Median seconds per step over the log windows; the first window, which holds the
    step's compilation, is left out when there are others. None before the first log."""
    windows = self.seconds_per_step[1:] or self.seconds_per_step
    return float(np.median(windows)) if windows else None

  def check(self) -> None:
    # Only the metrics since the last check come to the host, in one transfer; between checks
    # the loop never waits on the devices.
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
    # Skipped steps' metrics are the non-finite ones, so the means leave them out; a window
    # that skipped every step has nothing else to report and logs them as they are.
    applied = [m for m in self.pending if not m.get('skipped')] or self.pending
    means = {k: float(np.mean([m[k] for m in applied])) for k in self.pending[0] if k != 'skipped'}
    if 'skipped' in self.pending[0]:
      means['skipped_steps'] = float(sum(m['skipped'] for m in self.pending))
      self.skipped_total += int(means['skipped_steps'])
    # Wall time includes the first step's compilation in the first window, and any evaluation
    # or checkpoint in between, so the rate is a lower bound on the step's own speed.
    steps_per_sec = len(self.pending) / (time.time() - self.start)
    self.seconds_per_step.append(1 / steps_per_sec)
    means['examples_per_sec'] = steps_per_sec * self.config.batch_size
    self._reset(step + 1)
    writer.write(step, {f'train/{k}': v for k, v in means.items()})
    eta = (last - step) / steps_per_sec
    logging.info(
      'step %d/%d: loss %.4f, accuracy %.4f, %.2f steps/s, ETA %.0f s',
      step,
      last,
      means['loss'],
      means['accuracy'],
      steps_per_sec,
      eta,
    )


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
    # Patience 0 turns early stopping off; the best step is still tracked for the summary.
    return 0 < self.patience <= self.since


def train_and_evaluate(config: Any, directory: str, *, allow_config_change: bool = False) -> dict:
  """Trains and evaluates as `config` says, resuming from `directory` if it holds a checkpoint.

  Writes (process 0) the workdir's record (`ftlab.files.workdir`), metrics, TensorBoard
  events and `summary.json`; every process takes part in `checkpoints/`. A multi-stage plan
  compiles one step per stage; at a boundary the parameters carry over and the optimizer
  state is rebuilt. A rerun resumes only under the config the run started with, up to what a
  resume may change (`workdir.RESUMABLE_CHANGES`), unless `allow_config_change`.

  Returns:
    The summary dict written to `summary.json`.

  Raises:
    InputError: a bad config or input, or another config than the workdir's run, before
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
  current = _enter(run, run.start, run.state, run.frozen_reference, first)
  stages = [current]
  # Stream 1 of the run's seed; stream 0 drew the initial weights (`run.initial_variables`).
  # The step folds in its number, so one key serves the whole run and a resume.
  state, rng = spread.replicate(run.state), jax.random.fold_in(jax.random.key(config.seed), 1)
  writer = metric_writers.MetricWriter(
    run.workdir.metrics, run.workdir.tensorboard, enabled=is_writer
  )
  window, best = _Window(first + 1, spread, config), _Best(config.early_stopping_patience)
  stop, results, costs = False, {}, {}
  held_out = f'{run.data.held_out}/accuracy'  # the split that picks the best step

  logging.info('training steps %d..%d under %s', first + 1, last, current.plan.name)
  with parallel.PreemptionNotice() as notice:
    for step in range(first + 1, last + 1):
      if current.end is not None and step > current.end:  # the next stage of a schedule
        current, state = _next_stage(run, current, state, step)
        stages.append(current)
      # Before the step, so the mask chosen after `step - 1` steps is the one this step trains.
      state = run.scorer.remask(current.plan, state, step - 1)  # a dynamic mask's, if due
      batch = next(current.train_batches)
      # Once per plan, before its first step: the cost analysis compiles a separate program, so
      # it is not repeated.
      if config.record_step_flops and current.plan.key not in costs:
        costs[current.plan.key] = parallel.compiled_costs(current.p_train_step, state, batch, rng)
      # The state passed in is donated; only the returned one may be used from here on.
      state, metrics = current.p_train_step(state, batch, rng)
      window.add(metrics)
      # Asked every step, on every process, whether or not a signal came: the multi-process
      # agreement needs every process to report each step.
      preempted = notice.reached(step)  # the same answer on every process
      log = is_time(step, config.log_every_steps, last)
      save = is_time(step, config.checkpoint_every_steps, last) or bool(preempted)
      if log or save:  # nothing non-finite is ever logged as a mean or checkpointed
        window.check()
      if log:
        window.log(step, last, writer)
      # Evaluate before saving, so an early stop decided by this evaluation still writes the
      # checkpoint of the step it stopped at.
      evaluate = is_time(step, config.eval_every_steps, last)
      if evaluate:
        results = _evals(run, state, step, writer)
        stop = best.update(step, results[held_out])
      if save or stop:
        _save(run, state, current.plan, step)
      if evaluate or save or stop:
        window.restart_clock()  # the step time measures steps, not evaluations or saves
      # After the save above: a preemption always leaves the checkpoint of the step it finished.
      if preempted:
        writer.close()
        raise Preempted(step, preempted)
      if stop:
        logging.info(
          'early stop at step %d: %d evals without a better %s', step, best.since, held_out
        )
        break
  if not results:  # resumed at the end: evaluate what was restored
    results = _evals(run, state, first, writer)
  writer.close()
  final = jax.device_get(spread.unreplicate(state))
  _check_all_skipped(config, int(final.step) - first, window.skipped_total)
  # The last stage's frozen leaves only; earlier stages were checked at their boundaries.
  frozen = _check_frozen(current.plan, current.frozen_reference, final.params)
  summary = _summary(run, final, stages, results, best, stop, window, costs, frozen)
  summary['wall_time_sec'] = time.time() - wall_start
  if is_writer:
    workdir.write_summary(run.workdir, summary)
  return summary


def step_costs(config: Any) -> dict:
  """XLA's analyses of the train step of `config`'s last stage, without training: the
  `train_step_flops` and `train_step_memory` a run with `config.record_step_flops` puts in its
  summary (`parallel.compiled_costs`; the same program, so a hit in the persistent compilation
  cache when one is configured), for a run that did not record them. A schedule's last stage
  (LP-FT's full fine-tuning after its probe) is what a summary reports, so it is measured here.

  The run is assembled as `train_and_evaluate` assembles it (data, weights, the stage's plan,
  its freshly built optimizer state and step, a frozen prefix's cache), in a temporary
  directory that is removed after: nothing is written where a run lives.

  Raises:
    InputError: as `train_and_evaluate`, before anything is compiled.
  """
  with tempfile.TemporaryDirectory(prefix='ftlab_step_costs_') as scratch:
    run = make_run(config, scratch)
    done = config.num_train_steps - 1  # steps done before the last one
    at, host = run.stage_at(done), run.state
    if at is not run.start:  # the state as the last stage starts: its own optimizer state
      host = _restart(at, host)
    reference = policies.frozen_checksums(at.plan, host.params)
    stage = _enter(run, at, host, reference, done)
    state = run.spread.replicate(host)
    rng = jax.random.fold_in(jax.random.key(config.seed), 1)
    costs = parallel.compiled_costs(stage.p_train_step, state, next(stage.train_batches), rng)
  return _costs_fields(costs)


def _evals(run: Run, state: TrainState, step: int, writer: metric_writers.MetricWriter) -> dict:
  """Every evaluator's metrics at `step`, written and logged."""
  found = {}
  for evaluator in run.evaluators:
    logging.info('step %d: %s', step, evaluator.name)
    metrics = evaluator.run(state)
    writer.write(step, metrics)
    found.update(metrics)
  return found


def _save(run: Run, state: TrainState, plan: policies.Plan, step: int) -> None:
  """Checkpoint `step`: the whole train state, with the plan and config in its meta."""
  # The host copy is what is written: a checkpoint of the replicated layout would hold one
  # copy per device and not restore under another device count.
  host_state = jax.device_get(run.spread.unreplicate(state))
  meta = {
    'plan': plan.name,
    # Resume compares the key (structured), not the display name, to tell a new stage from
    # the same plan (`run._restore_step`).
    'plan_key': plan.key.as_json(),
    'config': run.config.to_dict(),
    'step': step,
    'ftlab_version': ftlab.version(),  # a later ftlab names it when the state does not fit
  }
  checkpoint.save(
    run.workdir.checkpoints, step, host_state, meta, max_to_keep=run.config.keep_checkpoints
  )


def _record_launch(run: Run) -> None:
  """The workdir's record of this launch (`ftlab.files.workdir.record_launch`), data logged."""
  data = run.data.describe()
  workdir.log_data(data)
  workdir.record_launch(
    run.workdir,
    run.config,
    policies.audit_table(run.start.plan, run.state.params),
    int(run.state.step),
    run.changes,
    data,
    processes=jax.process_count(),
    devices=jax.device_count(),
    warnings=run.warnings,
    version=ftlab.version(),
  )


def _summary(run, final, stages, results, best, stop, window, costs, frozen) -> dict:
  """`summary.json` but for the wall time."""
  select, plan = run.data.held_out, stages[-1].plan
  cached = {s.plan.name: s.cached_from for s in stages if s.cached_from}
  n_trainable, n_total = policies.trainable_count(plan, final.params)
  summary = {'plan': run.plan_label, 'steps': int(final.step)}
  if run.warnings:
    summary['warnings'] = list(run.warnings)
  for evaluator in run.evaluators:
    summary.update(evaluator.summary(results))
  summary.update(
    {
      f'best_{select}_accuracy': best.accuracy,
      f'best_{select}_step': best.step,
      'stopped_early': stop,
      'skipped_steps': window.skipped_total,
      # The last stage's plan: its trainable count and its compiled step's FLOPs (XLA).
      'trainable_parameters': n_trainable,
      'total_parameters': n_total,
      'trainable_percent': 100.0 * n_trainable / n_total,
      'init': run.init.summary() if run.init else {},
      # What the weights expect of an image: exports carry it to whoever loads them.
      'inputs': {
        'preprocess': run.data.preprocess,
        'image_size': run.data.image_size,
        'classes': list(run.data.train.class_names),
      },
      # What the last stage costs: its optimizer state (bytes of every leaf, as checkpointed)
      # and its compiled step's FLOPs and per-device memory (XLA's analyses, `compiled_costs`).
      'optimizer_state_bytes': optimizer_state_bytes(final.opt_state),
      **_costs_fields(costs.get(plan.key)),
    }
  )
  step_time = window.step_time()
  if step_time is not None:
    summary['step_time_sec'] = step_time
  if len(run.stages) > 1:
    summary['stages'] = _stage_summary(run, costs)
  if cached:  # plans whose steps ran on cached prefix outputs, with the first block they ran
    summary['activation_cache'] = cached
  # Frozen leaves checked bit for bit against the loaded values (sha256 per leaf).
  summary.update(
    frozen_leaves=len(frozen),
    frozen_checksum=policies.combined_checksum(frozen),
    frozen_unchanged=True,
  )
  return summary


def optimizer_state_bytes(opt_state: Any) -> int:
  """Bytes of every array leaf of `opt_state` (one copy: the host state, not per device)."""
  return int(sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(opt_state)))


def _costs_fields(costs: dict | None) -> dict:
  """`train_step_flops` and `train_step_memory` from `compiled_costs`, if it ran."""
  if costs is None:  # config.record_step_flops off
    return {}
  return {'train_step_flops': costs['flops'], 'train_step_memory': costs['memory']}


def _stage_summary(run: Run, costs: dict) -> list[dict]:
  rows = []
  for at in run.stages:
    s = at.stage
    end = s.end if s.end is not None else run.config.num_train_steps
    rows.append({'plan': s.name, 'first_step': s.start + 1, 'last_step': end})
    rows[-1].update(_costs_fields(costs.get(s.key)))
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
    # A skipped step's metrics are non-finite by definition; the update was not applied, so
    # they need not stop the run.
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
