"""A study: one config, from a grid of runs to a paper's table.

  python scripts/study.py --study configs/studies/NAME.py[:args] --workdir DIR \
      [--select] [--workers N] [--isolate] [--shard i/n] [--report_only]

A study config (`configs/studies/*.py`, `get_config(arg)` returning an ml_collections
ConfigDict, or a `.json` file of the same fields, as `scripts/sweep.py` writes one;
`configs/studies/smoke.py` documents every field) names the run config every run
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
directory (DIR may be on an object store, gs://). Before anything trains, every (task, plan)'s
run config is built and its plan checked on the model's parameter shapes, and every finished
run's config is compared with the study's: a bad plan or a finished run under another config
is refused in one line (exit 2: use another --workdir, or delete the run). A finished run is
skipped; an unfinished one resumes from its last checkpoint, so a killed study, rerun with the
same command, goes on where it stopped. Runs share the XLA compilation cache (`DIR/xla_cache`)
and the frozen-prefix activation cache (`DIR/activation_cache`).

Runs go one after the other in this process (the default: a failing run stops the study with
its error), or each in its own process (`--isolate`, and always with `--workers N` > 1: N at a
time, each with its share of the GPUs or cores, `scripts/run_pool.py`), where a run that fails
is marked failed (`RUN/process.json`, `RUN/log.txt`; the report lists it), the others go on and
the study exits 1; the same command retries it. `--shard i/n` runs the i-th of n shares of each
phase, for several hosts writing into one shared DIR: a share waits for every selection run to
settle before its test phase, and each share writes the report of what has finished.

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
import json
import os
import re
import signal
import sys
import time

import ml_collections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [p for p in (ROOT, os.path.dirname(os.path.abspath(__file__))) if p not in sys.path]

import plots  # noqa: E402
import readme_section  # noqa: E402
import run_pool  # noqa: E402
import study_report  # noqa: E402
from study_config import Job, StudyError, load_study, run_config  # noqa: E402

from ftlab import loop  # noqa: E402
from ftlab.errors import InputError  # noqa: E402
from ftlab.files import checkpoint, storage, workdir  # noqa: E402


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
  """Every seed at the chosen rate; seed by seed, so an interrupted study has whole seeds. A
  (task, plan) with no chosen rate (every candidate failed) has none."""
  return [
    Job(task, plan, int(seed), chosen[task, plan])
    for seed in study['seeds']
    for task in study['tasks']
    for plan in study['plans']
    if chosen.get((task, plan)) is not None
  ]


def finished(root: str, job: Job) -> bool:
  return storage.path(workdir.Workdir(job.directory(root)).summary).exists()


def check_runs(study: dict, root: str) -> None:
  """Before anything trains: every (task, plan)'s run config builds and its plan (every stage,
  its optimizer) builds on the model's parameter shapes (`ftlab.run.check_plans`, no data
  read), and no finished run of the study's candidates ran another config.

  Raises:
    StudyError: a field the run config lacks, or a plan that cannot be built, naming both.
    workdir.ConfigChanged: a finished run of another config in the way.
  """
  from ftlab import run as ftlab_run

  seed = int(study['seeds'][0])
  for task in study['tasks']:
    for plan in study['plans']:
      job = Job(task, plan, seed, study_report.learning_rates(study, plan)[0])
      config = run_config(study, job, root)
      try:
        # The class count sizes the head only; it never changes which parameters train.
        ftlab_run.check_plans(config, len(config.dataset.classes) or 10)
      except InputError as e:
        policy = study['plans'][plan]['policy']
        what = f'plan {plan!r}' + (f' ({policy})' if policy != plan else '')
        raise StudyError(f'task {task!r}, {what}: {run_pool.last_line(str(e))}') from None
  candidates = [
    Job(task, plan, int(seed), lr)
    for task in study['tasks']
    for plan in study['plans']
    for lr in study_report.learning_rates(study, plan)
    for seed in study['seeds']
  ]
  for job in candidates:
    if finished(root, job):
      _check_unchanged(run_config(study, job, root), job.directory(root))


def _check_unchanged(config: ml_collections.ConfigDict, directory: str) -> dict:
  """The config changes of the run in `directory` ({} for a new run).

  Raises:
    workdir.ConfigChanged: a run of another config; or of another length, which ftlab would
      extend, but a study does not (the schedule would differ from a fresh run).
  """
  changes = workdir.check_config_change(config, workdir.Workdir(directory), allow=False)
  if 'num_train_steps' in changes:
    old, new = changes['num_train_steps']
    raise workdir.ConfigChanged(
      f'{directory} ran num_train_steps={old}, the study now asks {new}; a study does not '
      'extend runs (the schedule would differ from a fresh run). Use a new --workdir'
    )
  return changes


def train(study_spec: str, root: str, job: Job) -> str:
  """Runs `job` unless it finished before; returns a one-line account of it.

  Raises:
    workdir.ConfigChanged: the run's directory holds a run of another config.
  """
  import jax

  # Per process: the shared compilation cache (a local directory: JAX's cache is not for an
  # object store; a gs:// study compiles each run) and quiet checkpoint logs.
  if not storage.is_remote(root):
    jax.config.update('jax_compilation_cache_dir', os.path.join(root, 'xla_cache'))
  checkpoint.quiet_orbax_logs()
  config = run_config(load_study(study_spec), job, root)
  directory = job.directory(root)
  _check_unchanged(config, directory)
  if finished(root, job):
    return f'{os.path.relpath(directory, root)}: done before, skipped'
  start = time.time()
  summary = loop.train_and_evaluate(config, directory)
  accuracy = summary['final_eval_accuracy']
  return (
    f'{os.path.relpath(directory, root)}: test accuracy {accuracy:.4f}, {time.time() - start:.0f} s'
  )


def job_command(study_spec: str, root: str, job: Job) -> list[str]:
  """The command that runs `job` alone in a new process (`--job`)."""
  script = os.path.abspath(__file__)
  spec = json.dumps(dataclasses.asdict(job))
  return [sys.executable, script, f'--study={study_spec}', f'--workdir={root}', f'--job={spec}']


@dataclasses.dataclass
class Phase:
  """What `run_jobs` did: runs trained (or tried) here, found finished, failed."""

  trained: int = 0
  done_before: int = 0
  failed: int = 0

  def __iadd__(self, other: Phase) -> Phase:
    self.trained += other.trained
    self.done_before += other.done_before
    self.failed += other.failed
    return self


def run_jobs(
  study_spec: str,
  root: str,
  jobs: list[Job],
  *,
  workers: int = 1,
  isolate: bool = False,
  command_fn=job_command,
) -> Phase:
  """Runs the unfinished of `jobs`: here one after the other (a failure raises), or each in its
  own process, `workers` at a time (`isolate` or `workers` > 1: a failure is recorded in its
  directory and the others go on). `command_fn(study_spec, root, job)` is the process's
  command line."""
  todo = [job for job in jobs if not finished(root, job)]
  phase = Phase(trained=len(todo), done_before=len(jobs) - len(todo))
  if workers <= 1 and not isolate:
    for job in todo:
      print(train(study_spec, root, job), flush=True)
    return phase
  launches = [
    run_pool.Launch(
      command_fn(study_spec, root, job),
      job.directory(root),
      os.path.relpath(job.directory(root), root),
    )
    for job in todo
  ]
  phase.failed = sum(code != 0 for code in run_pool.run_all(launches, workers))
  return phase


def wait_for(root: str, jobs: list[Job], seconds: float = 10.0) -> None:
  """Waits until every job of `jobs` (other shares' too) has finished or failed."""
  while not all(finished(root, job) or run_pool.returncode(job.directory(root)) for job in jobs):
    time.sleep(seconds)


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
  if storage.path(path).exists():
    return json.loads(storage.path(path).read_text())
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
  summary = json.loads(storage.path(workdir.Workdir(directory).summary).read_text())
  if 'train_step_memory' in summary:
    return {}
  if storage.path(path).exists():
    return json.loads(storage.path(path).read_text())
  found = loop.step_costs(run_config(study, job, root))
  storage.write_whole(path, json.dumps(found, indent=2) + '\n')
  return found


def record_study(study: dict, spec: str, root: str) -> None:
  """`DIR/study.json`: the study's config and where it came from (the report's other input)."""
  storage.path(root).mkdir(parents=True, exist_ok=True)
  record = {'spec': spec, 'study': study}
  path = os.path.join(root, study_report.STUDY_FILE)
  storage.write_whole(path, json.dumps(record, indent=2) + '\n')


def parse_shard(text: str) -> tuple[int, int]:
  """`'i/n'` -> (i, n).

  Raises:
    StudyError: not two whole numbers with 0 <= i < n.
  """
  match = re.fullmatch(r'(\d+)/(\d+)', text)
  if not match or not int(match[1]) < int(match[2]):
    raise StudyError(f'--shard {text!r} is not i/n with 0 <= i < n')
  return int(match[1]), int(match[2])


def run_study(
  spec: str,
  root: str,
  *,
  select_only: bool = False,
  workers: int = 1,
  isolate: bool = False,
  shard: tuple[int, int] = (0, 1),
  command_fn=job_command,
) -> dict:
  """The protocol of the module docstring; returns the report (`study_report.build`), whose
  `failed` lists the runs that failed (in their own processes).

  Raises:
    StudyError: a study config that cannot run, before any run starts.
    workdir.ConfigChanged: a finished run of another config in the way.
  """
  study = load_study(spec)
  check_runs(study, root)  # a typo or a bad plan fails now, not hours in
  record_study(study, spec, root)
  start = time.time()
  index, count = shard
  run = dict(workers=workers, isolate=isolate, command_fn=command_fn)
  selection = selection_jobs(study)
  ran = Phase()
  if selection:
    mine = selection[index::count]
    todo = sum(not finished(root, job) for job in mine)
    print(f'selection: {len(selection)} runs, {len(mine)} in this share, {todo} to run', flush=True)
    ran += run_jobs(spec, root, mine, **run)
    wait_for(root, selection)  # the other shares' candidates too
  report = study_report.build(root)
  if select_only:
    print(study_report.selection_markdown(report))
    return report
  chosen = {(r['task'], r['plan']): r.get('chosen') for r in report['selection']}
  for (task, plan), lr in chosen.items():
    if lr is None:
      print(f'{task}/{plan}: every candidate rate failed; no test runs', flush=True)
  tests = test_jobs(study, chosen)
  mine = tests[index::count]
  todo = sum(not finished(root, job) for job in mine)
  print(f'test: {len(tests)} runs, {len(mine)} in this share, {todo} to run', flush=True)
  ran += run_jobs(spec, root, mine, **run)
  # The delta file's size and the step's costs once per (task, plan), on the first seed's run:
  # the plan fixes which entries change and what the step holds, the seed barely moves either.
  for job in mine:
    if job.seed == int(study['seeds'][0]) and finished(root, job):
      record_delta_size(job.directory(root))
      record_step_costs(study, root, job)
  report = study_report.write(root)
  failed = f' ({ran.failed} failed)' if ran.failed else ''
  print(
    f'{ran.trained} runs trained{failed}, {ran.done_before} done before; '
    f'{time.time() - start:.0f} s'
  )
  return report


def run_one(spec: str, root: str, job_json: str) -> int:
  """`--job`: one run of the study in this process, as `python -m ftlab.main` runs one: its
  exit code (2 a bad input, 1 a non-finite loss or moved frozen parameters, 128 + signal when
  stopped)."""
  from absl import logging

  logging.set_verbosity(logging.INFO)  # the run's own log (RUN/log.txt), as ftlab.main writes
  job = Job(**json.loads(job_json))
  try:
    print(train(spec, root, job), flush=True)
  except InputError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except (FloatingPointError, loop.FrozenParametersChanged) as e:  # the run's files stay
    print(f'error: {e}', file=sys.stderr)
    return 1
  except loop.Preempted as e:
    print(e, file=sys.stderr)
    return 128 + e.signum
  return 0


def sigterm_as_interrupt(signum, frame):
  """A SIGTERM handler for a parent of run processes: it stops them as Ctrl-C does."""
  raise KeyboardInterrupt(signum)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--study', required=True, help='configs/studies/NAME.py[:args]')
  parser.add_argument('--workdir', required=True, help='where the runs and the report go')
  parser.add_argument('--select', action='store_true', help='stop after the selection phase')
  parser.add_argument('--workers', type=int, default=1, help='runs at a time, each a process')
  parser.add_argument(
    '--isolate',
    action='store_true',
    help='each run in its own process (implied by --workers > 1): a failed run is marked and '
    'the others go on',
  )
  parser.add_argument('--shard', default='0/1', help='i/n: run the i-th of n shares of runs')
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
  parser.add_argument('--job', default='', help=argparse.SUPPRESS)  # one run: run_pool's child
  args = parser.parse_args(argv)
  if args.workers < 1:
    parser.error(f'--workers {args.workers}: need 1 or more')
  if args.job:
    return run_one(args.study, args.workdir, args.job)
  from absl import logging

  if not args.log_runs:
    logging.set_verbosity(logging.WARNING)  # one line per run instead of each run's log
  isolate = args.isolate or args.workers > 1
  if isolate:  # the runs are children: SIGTERM stops them (each checkpoints), then this
    signal.signal(signal.SIGTERM, sigterm_as_interrupt)
    import jax

    # This process only checks plans on shapes and measures finished runs: the accelerators
    # are the runs'.
    jax.config.update('jax_platforms', 'cpu')
  markers = readme_markers(args.section or args.study)
  try:
    shard = parse_shard(args.shard)
    if args.readme:  # a README that cannot take the report fails now, not after the runs
      try:
        readme_section.check(args.readme, markers)
      except OSError as e:
        raise readme_section.ReadmeError(f'--readme {args.readme}: {e.strerror}') from None
    if args.report_only:  # this study's report of the runs there: nothing trained or measured
      record_study(load_study(args.study), args.study, args.workdir)
      report = study_report.write(args.workdir)
    else:
      report = run_study(
        args.study,
        args.workdir,
        select_only=args.select,
        workers=args.workers,
        isolate=isolate,
        shard=shard,
      )
  except InputError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except KeyboardInterrupt as e:  # SIGINT, or SIGTERM with the runs in their own processes
    print('study interrupted; the same command resumes it', file=sys.stderr)
    return 128 + (e.args[0] if e.args else signal.SIGINT)
  except loop.Preempted as e:  # SIGTERM: the run's checkpoint is written
    print(f'study stopped: {e}', file=sys.stderr)
    return 128 + e.signum
  if args.select:
    return 0
  text = storage.path(os.path.join(args.workdir, study_report.MARKDOWN)).read_text()
  if args.readme:
    readme_section.replace(args.readme, markers, text.strip())
    copy_plots(args.workdir, args.readme, section_name(args.section or args.study))
  print(text)
  return 1 if report['failed'] else 0


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
