"""A study: one config, from a grid of runs to a paper's table.

  python scripts/study.py --study configs/studies/NAME.py[:args] --workdir DIR \
      [--select] [--workers N] [--report_only]

A study config (`configs/studies/*.py`, `get_config(arg)` returning an ml_collections
ConfigDict; `configs/studies/smoke.py` documents every field) names the run config every run
starts from, the tasks (each a set of run-config overrides: dataset, label budget, image size,
and a group for suites that have them), the plans (plan expressions with a label and a family),
the seeds, the candidate learning rates, the minival split and the baseline plan.

The protocol is tune-then-test, as VTAB's (Zhai et al. 2019, google-research/task_adaptation)
and ViT_PEFT_Vision's drivers run it:

1. Selection: each (task, plan) trains at every candidate learning rate on the first seed and
   is scored on the minival split (`dataset.minival`: carved from the end of the training split,
   or a split named for it, as VTAB's val200; either way disjoint from the labelled draw's pool
   and the test split). The rate with the best
   final minival accuracy is chosen (a tie: the smaller rate). With one candidate there is
   nothing to choose and no selection phase.
2. Test: every seed trains at the chosen rate and is evaluated on the test split. The first
   seed's run at the chosen rate is the selection's run (the same config): it is not repeated.

Every run lives in `DIR/runs/<task>/<plan>/lr<lr>/seed<seed>/` and is an ordinary ftlab run
directory. A finished run is skipped; a finished run under another config is refused (one line,
exit 2: use another --workdir, or delete the run); an unfinished one resumes from its last
checkpoint, so a killed study, rerun with the same command, goes on where it stopped. Runs share
the XLA compilation cache (`DIR/xla_cache`) and the frozen-prefix activation cache
(`DIR/activation_cache`). They run one after the other in this process, or in `--workers N`
processes (each run in one of them, so N runs at a time).

After the runs, the first seed's run of each (task, plan) records the size of its masked-delta
file (`RUN/masked_delta.json`, computed in memory) and, when its config did not record them,
its train step's FLOPs and memory (`RUN/step_costs.json`, one compile, no training); then
`scripts/study_report.py` writes
`DIR/report.json`, `DIR/report.md` and the plots from the run directories and
`DIR/study.json` (this study's config, written here), so
`--report_only` rebuilds them for `--study` (recorded as DIR's study) from the runs already in
DIR, training and measuring nothing, so one workdir's runs can be reported as several studies
(a subset of plans, another baseline); `python scripts/study_report.py DIR` rebuilds DIR's
recorded study's.
`--select` stops after the selection phase and prints its minival table.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import multiprocessing
import os
import sys
import time
from typing import Iterable

import ml_collections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [p for p in (ROOT, os.path.dirname(os.path.abspath(__file__))) if p not in sys.path]

import plots  # noqa: E402
import readme_section  # noqa: E402
import study_report  # noqa: E402

from ftlab import loop  # noqa: E402
from ftlab.errors import InputError  # noqa: E402
from ftlab.files import checkpoint, storage, workdir  # noqa: E402


class StudyError(InputError):
  """A study config that cannot run: a missing or unknown field, a bad value."""


@dataclasses.dataclass(frozen=True)
class Job:
  """One run of the study."""

  task: str
  plan: str
  seed: int
  lr: float

  def directory(self, root: str) -> str:
    return study_report.run_directory(root, self.task, self.plan, self.lr, self.seed)


def load_config(spec: str, what: str) -> ml_collections.ConfigDict:
  """`get_config(arg)` of the config file `path[:arg]` (as `ml_collections.config_flags` reads
  it; a relative path is taken from the repository root when it is not found here).

  Raises:
    StudyError: no such file, no `get_config` in it, or an argument it refuses (ValueError).
  """
  path, _, arg = spec.partition(':')
  if not os.path.exists(path) and os.path.exists(os.path.join(ROOT, path)):
    path = os.path.join(ROOT, path)
  if not os.path.isfile(path):
    raise StudyError(f'{what} {spec!r}: no such file {path!r}')
  module_spec = importlib.util.spec_from_file_location(f'_ftlab_config_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise StudyError(f'{what} {spec!r}: {path} has no get_config(arg)')
  try:
    return module.get_config(arg or None)
  except ValueError as e:  # a config's own argument check (`default.parse_arg`, a task list)
    raise StudyError(f'{what} {spec!r}: {e}') from None


def load_study(spec: str) -> dict:
  """The study config `path[:arg]` as plain JSON data, its tasks and plans in the order written
  (a ConfigDict iterates its keys sorted; its JSON keeps them as given).

  Raises:
    StudyError: no such file, no `get_config`, or a study that cannot run (`check_study`).
  """
  study = json.loads(load_config(spec, 'study').to_json())
  check_study(study, spec)
  return study


def check_study(study: dict, spec: str) -> None:
  """Raises StudyError naming the first field of `study` that cannot run."""
  for field in ('base', 'tasks', 'plans', 'seeds', 'learning_rates', 'minival', 'baseline'):
    if field not in study:
      raise StudyError(f'study {spec!r} has no field {field!r} (configs/studies/smoke.py has all)')
  for field in ('tasks', 'plans', 'seeds', 'learning_rates'):
    if not len(study[field]):
      raise StudyError(f'study {spec!r}: {field} is empty')
  seeds = [int(s) for s in study['seeds']]
  if len(set(seeds)) != len(seeds):
    raise StudyError(f'study {spec!r}: seeds {seeds} repeat a seed')
  for plan, about in study['plans'].items():
    lrs = [float(lr) for lr in about.get('learning_rates', study['learning_rates'])]
    if not lrs or any(lr <= 0 for lr in lrs) or len(set(lrs)) != len(lrs):
      raise StudyError(
        f'study {spec!r}: plan {plan!r}: learning_rates {lrs} must be distinct and > 0'
      )
    for task in study['tasks']:
      if len(lrs) > 1 and not study_report.minival(study, task):
        raise StudyError(
          f'study {spec!r}: plan {plan!r} has {len(lrs)} learning rates to choose from, but '
          f"task {task!r} has no minival split to choose on (set minival, e.g. '1000' or "
          "'10%' of the training split)"
        )
  if study['baseline'] and study['baseline'] not in study['plans']:
    raise StudyError(
      f'study {spec!r}: baseline {study["baseline"]!r} is not one of the plans '
      f'({", ".join(study["plans"])})'
    )
  for name, plan in study['plans'].items():
    if 'policy' not in plan:
      raise StudyError(f'study {spec!r}: plan {name!r} has no policy (a plan expression)')
  for kind in ('tasks', 'plans'):
    for name in study[kind]:
      if '/' in name or name in ('', '.', '..'):
        raise StudyError(f'study {spec!r}: {kind} name {name!r} cannot name a directory')


def _apply(config: ml_collections.ConfigDict, overrides: Iterable, where: str) -> None:
  """Sets each `(dotted.field, value)` of `overrides` in `config`.

  Raises:
    StudyError: a field the run config does not have, or a value of another type.
  """
  for dotted, value in overrides:
    *parents, leaf = dotted.split('.')
    node = config
    for key in parents:
      if key not in node:
        raise StudyError(f'{where}: {dotted!r} is not a field of the run config')
      node = node[key]
    if leaf not in node:
      raise StudyError(f'{where}: {dotted!r} is not a field of the run config')
    if isinstance(node[leaf], tuple) and isinstance(value, list):  # JSON has no tuples
      value = tuple(value)
    try:
      node[leaf] = value
    except TypeError as e:
      raise StudyError(f'{where}: {dotted}={value!r}: {e}') from None


def run_config(study: dict, job: Job, root: str) -> ml_collections.ConfigDict:
  """The run config of `job`: the study's base config, then the study's, the task's and the
  plan's overrides, then the plan expression, seed, learning rate, minival and shared cache.

  A plan's `policy` may use `{steps}`, `{half}` and `{quarter}` (of the run's steps), so
  schedules and dynamic masks follow the task's step count.
  """
  config = load_config(study['base'], 'base config')
  _apply(config, study.get('overrides', ()), 'overrides')
  _apply(config, study['tasks'][job.task].get('overrides', ()), f'task {job.task}')
  plan = study['plans'][job.plan]
  _apply(config, plan.get('overrides', ()), f'plan {job.plan}')
  steps = config.num_train_steps
  policy = plan['policy'].format(steps=steps, half=steps // 2, quarter=max(steps // 4, 1))
  config.policy.name = policy
  config.seed = job.seed
  config.optimizer.learning_rate = job.lr
  config.dataset.minival = study_report.minival(study, job.task)
  config.activation_cache_dir = os.path.join(root, 'activation_cache')
  return config


def selection_jobs(study: dict) -> list[Job]:
  """Every (task, plan) at every candidate rate on the first seed; none for a plan with one
  candidate."""
  seed = int(study['seeds'][0])
  return [
    Job(task, plan, seed, lr)
    for task in study['tasks']
    for plan in study['plans']
    if len(study_report.learning_rates(study, plan)) > 1
    for lr in study_report.learning_rates(study, plan)
  ]


def test_jobs(study: dict, chosen: dict[tuple[str, str], float]) -> list[Job]:
  """Every seed at the chosen rate; seed by seed, so an interrupted study has whole seeds."""
  return [
    Job(task, plan, int(seed), chosen[task, plan])
    for seed in study['seeds']
    for task in study['tasks']
    for plan in study['plans']
  ]


def train(study_spec: str, root: str, job: Job) -> str:
  """Runs `job` unless it finished before; returns a one-line account of it.

  Raises:
    workdir.ConfigChanged: the run's directory holds a run of another config.
  """
  import jax

  # Per process (a worker runs many jobs): the shared compilation cache and quiet logs.
  jax.config.update('jax_compilation_cache_dir', os.path.join(root, 'xla_cache'))
  checkpoint.quiet_orbax_logs()
  config = run_config(load_study(study_spec), job, root)
  directory = job.directory(root)
  files = workdir.Workdir(directory)
  changes = workdir.check_config_change(config, files, allow=False)  # {} for a new run
  if 'num_train_steps' in changes:
    # ftlab resumes a run with more steps, but its schedule then differs from a fresh run of
    # that length: in a study's table it would not be the run its config says.
    old, new = changes['num_train_steps']
    raise workdir.ConfigChanged(
      f'{directory} ran num_train_steps={old}, the study now asks {new}; a study does not '
      'extend runs (the schedule would differ from a fresh run). Use a new --workdir'
    )
  if os.path.exists(files.summary):
    return f'{os.path.relpath(directory, root)}: done before, skipped'
  start = time.time()
  summary = loop.train_and_evaluate(config, directory)
  accuracy = summary['final_eval_accuracy']
  return (
    f'{os.path.relpath(directory, root)}: test accuracy {accuracy:.4f}, {time.time() - start:.0f} s'
  )


def _train_in_worker(args: tuple[str, str, Job]) -> str:
  from absl import logging

  logging.set_verbosity(logging.WARNING)
  return train(*args)


def run_jobs(study_spec: str, root: str, jobs: list[Job], workers: int) -> list[str]:
  """Runs `jobs` here (`workers` 1) or in `workers` spawned processes; their accounts in order.

  A worker's run that fails (an InputError included) stops the study with that run's error.
  """
  if workers <= 1 or len(jobs) <= 1:
    lines = []
    for job in jobs:
      lines.append(train(study_spec, root, job))
      print(lines[-1], flush=True)
    return lines
  # Spawned, not forked: a forked copy of a process that has started JAX's runtime is unsafe.
  context = multiprocessing.get_context('spawn')
  with context.Pool(min(workers, len(jobs)), maxtasksperchild=None) as pool:
    lines = []
    for line in pool.imap(_train_in_worker, [(study_spec, root, job) for job in jobs]):
      lines.append(line)
      print(line, flush=True)
    return lines


def record_delta_size(directory: str) -> dict:
  """`RUN/masked_delta.json`, the size of the run's masked-delta file: the entries it changed
  on the weights it started from (`ftlab.analysis.masked_delta`, as `scripts/export_delta.py`
  writes it), serialized in memory, nothing else written. Read back when it exists.

  For a run without adapters, the file `scripts/export_delta.py RUN` writes, byte for byte
  (its header names the run's path, so the size moves with the path's length). A tuner's run
  is measured unfolded: its adapter's factors and the leaves it trains beside them, as peft
  saves an adapter (export_delta.py writes the folded kernels, which changed whole).
  """
  path = os.path.join(directory, study_report.DELTA_RECORD)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  import export_delta

  from ftlab.analysis import masked_delta

  delta, weights = export_delta.make_delta(directory, unfolded=True)
  found = {
    'masked_delta_bytes': len(masked_delta.serialize(delta)),
    'changed_entries': delta['header']['changed'],
    'entries': delta['header']['entries'],
    'step': weights.step,
  }
  storage.write_whole(path, json.dumps(found, indent=2) + '\n')
  return found


def record_step_costs(study: dict, root: str, job: Job) -> dict:
  """`RUN/step_costs.json`: XLA's analyses of `job`'s train step (`loop.step_costs`: FLOPs and
  the memory of the compiled step), for a finished run whose config left them out
  (`record_step_flops` off: the offline suite's runs skip the extra compile while they train).
  One more compile (a hit in the study's compilation cache), no training. Nothing is measured
  for a run whose summary has them; a record is read back when it exists.
  """
  directory = job.directory(root)
  path = os.path.join(directory, study_report.STEP_COSTS_RECORD)
  with open(workdir.Workdir(directory).summary) as f:
    if 'train_step_memory' in json.load(f):
      return {}
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  found = loop.step_costs(run_config(study, job, root))
  storage.write_whole(path, json.dumps(found, indent=2) + '\n')
  return found


def record_study(study: dict, spec: str, root: str) -> None:
  """`DIR/study.json`: the study's config and where it came from (the report's other input)."""
  os.makedirs(root, exist_ok=True)
  record = {'spec': spec, 'study': study}
  path = os.path.join(root, study_report.STUDY_FILE)
  storage.write_whole(path, json.dumps(record, indent=2) + '\n')


def run_study(spec: str, root: str, *, select_only: bool = False, workers: int = 1) -> dict:
  """The protocol of the module docstring; returns the report (`study_report.build`).

  Raises:
    StudyError: a study config that cannot run, before any run starts.
    workdir.ConfigChanged: a finished run of another config in the way.
  """
  study = load_study(spec)
  for task in study['tasks']:  # every run config builds, so a typo fails now, not hours in
    for plan in study['plans']:
      lr = study_report.learning_rates(study, plan)[0]
      run_config(study, Job(task, plan, int(study['seeds'][0]), lr), root)
  record_study(study, spec, root)
  start = time.time()
  selection = selection_jobs(study)
  ran = run_jobs(spec, root, selection, workers)
  report = study_report.build(root)
  if select_only:
    print(study_report.selection_markdown(report))
    return report
  chosen = {(r['task'], r['plan']): r['chosen'] for r in report['selection']}
  tests = test_jobs(study, chosen)
  ran += run_jobs(spec, root, tests, workers)
  # The delta file's size and the step's costs once per (task, plan), on the first seed's run:
  # the plan fixes which entries change and what the step holds, the seed barely moves either.
  for job in tests:
    if job.seed == int(study['seeds'][0]):
      record_delta_size(job.directory(root))
      record_step_costs(study, root, job)
  report = study_report.write(root)
  trained = sum('done before' not in line for line in ran)
  print(f'{trained} runs trained, {len(ran) - trained} done before; {time.time() - start:.0f} s')
  return report


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--study', required=True, help='configs/studies/NAME.py[:args]')
  parser.add_argument('--workdir', required=True, help='where the runs and the report go')
  parser.add_argument('--select', action='store_true', help='stop after the selection phase')
  parser.add_argument('--workers', type=int, default=1, help='runs at a time, each a process')
  parser.add_argument(
    '--report_only',
    action='store_true',
    help="write --study's report of the runs already in --workdir (nothing trained or measured)",
  )
  parser.add_argument('--log_runs', action='store_true', help="show each run's own log")
  parser.add_argument(
    '--readme',
    default='',
    help='also write report.md between the README markers <!-- SECTION:start/end --> and '
    'its plots to docs/SECTION_*.png beside the README',
  )
  parser.add_argument(
    '--section',
    default='',
    help='the README section --readme writes (default study-NAME, NAME the study file name '
    'without .py), so one study file with other arguments can fill another section',
  )
  args = parser.parse_args(argv)
  if args.workers < 1:
    parser.error(f'--workers {args.workers}: need 1 or more')
  from absl import logging

  if not args.log_runs:
    logging.set_verbosity(logging.WARNING)  # one line per run instead of each run's log
  markers = readme_markers(args.section or args.study)
  try:
    if args.readme:  # a README that cannot take the report fails now, not after the runs
      try:
        readme_section.check(args.readme, markers)
      except OSError as e:
        raise readme_section.ReadmeError(f'--readme {args.readme}: {e.strerror}') from None
    if args.report_only:  # this study's report of the runs there: nothing trained or measured
      record_study(load_study(args.study), args.study, args.workdir)
      study_report.write(args.workdir)
    else:
      run_study(args.study, args.workdir, select_only=args.select, workers=args.workers)
  except InputError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print('study interrupted; the same command resumes it', file=sys.stderr)
    return 130
  except loop.Preempted as e:  # SIGTERM: the run's checkpoint is written
    print(f'study stopped: {e}', file=sys.stderr)
    return 128 + e.signum
  if args.select:
    return 0
  with open(os.path.join(args.workdir, study_report.MARKDOWN)) as f:
    text = f.read()
  if args.readme:
    readme_section.replace(args.readme, markers, text.strip())
    copy_plots(args.workdir, args.readme, section_name(args.section or args.study))
  print(text)
  return 0


def section_name(spec: str) -> str:
  """The README section of a study's report: `configs/studies/smoke.py[:args]` -> study-smoke;
  a section name (no `.py`) names itself: `study-offline-full` -> study-offline-full."""
  path = spec.partition(':')[0]
  return f'study-{os.path.splitext(os.path.basename(path))[0]}' if path.endswith('.py') else spec


def readme_markers(spec: str) -> tuple[str, str]:
  """`<!-- NAME:start -->` and `<!-- NAME:end -->` of `section_name(spec)`."""
  name = section_name(spec)
  return f'<!-- {name}:start -->', f'<!-- {name}:end -->'


def copy_plots(root: str, readme: str, section: str) -> list[str]:
  """Copies the study's plots to `docs/<section>_<plot>.png` beside `readme` (the README shows
  them from there); returns the paths written."""
  docs = os.path.join(os.path.dirname(os.path.abspath(readme)), 'docs')
  written = []
  for name in plots.STUDY_PLOTS:
    target = os.path.join(docs, f'{section}_{name}')
    storage.write_whole(target, storage.path(os.path.join(root, name)).read_bytes())
    written.append(target)
  return written


if __name__ == '__main__':
  sys.exit(main())
