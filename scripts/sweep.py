"""Sweeps: a grid of plans x seeds (x learning rates) over one base config, as a study.

  # the grid on the command line; --pretrain first trains the source model into WORKDIR/source
  python scripts/sweep.py --workdir workdirs/sweep --config configs/demo.py:stage=finetune \\
    --pretrain configs/demo.py:stage=pretrain \\
    --plans linear_probe bitfit 'last_blocks(1)' 'bitfit | last_blocks(1)' --seeds 0 1 \\
    [--lrs 0.01 0.02] [--workers 2] [--baseline full] [-- --config.num_train_steps=300 ...]
  # the grid from a file (get_sweep(arg) returns these flags as a dict); flags given here win
  python scripts/sweep.py --workdir workdirs/sweep_demo --grid configs/sweep_demo.py[:runlocal]
  # one share of the grid per host or process group, into the same (shared) directory
  python scripts/sweep.py --workdir /shared/sweep --grid ... --shard 0/2   # and 1/2 elsewhere
  # the report again, from the directory alone (--readme: into README.md too)
  python scripts/sweep.py --workdir workdirs/sweep --report-only [--readme README.md]

A thin caller of the study driver (`scripts/study.py`): the grid becomes a study of one task
(the base config with the flags after `--`), one study plan per (plan expression, learning
rate), the grid's seeds and no selection (every rate of the grid is run on every seed, as a
grid does), written to `WORKDIR/sweep_study.json`; the driver runs it with every run in its
own process (`scripts/run_pool.py`): `--workers N` at once, each with its share of the GPUs or
cores, a failed run marked failed while the others go on (the sweep then exits 1; the same
command retries it), a finished run skipped, an interrupted one resumed. Runs live in
`WORKDIR/runs/<config>/<plan slug>[-lr<LR>]/lr<LR>/seed<S>`; the report is the driver's
(`report.md`, `report.json`, `accuracy_vs_params.png`, `heatmap.png`: mean, 95% interval,
costs, paired differences with `--baseline`), plus `results.csv` (one row per run: plan, seed,
lr, status done/failed/pending, accuracy and costs) for spreadsheets.

Before anything runs, every plan is built on parameter shapes and the recorded sweep
(`sweep.json`: base config, pretraining config and overrides) is compared with this one: a bad
plan, grid, flag or a changed sweep in the same directory stops with one line and exit code 2.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import os
import re
import shlex
import signal
import sys
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [p for p in (ROOT, os.path.dirname(os.path.abspath(__file__))) if p not in sys.path]

import readme_section  # noqa: E402
import run_pool  # noqa: E402
import study  # noqa: E402
import study_report  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from ftlab import cli  # noqa: E402
from ftlab.errors import InputError  # noqa: E402
from ftlab.files import storage  # noqa: E402

EXIT_BAD_INPUT = 2
STUDY_FILE = 'sweep_study.json'  # the study this sweep runs (the driver's --study)
GRID_FILE = 'sweep.json'
SECTION = 'sweep-results'


class BadInput(InputError):
  """A bad grid, plan or flag: one line and exit code 2, before any run starts."""


def slug(plan: str) -> str:
  """A directory name for a plan: 'bitfit | last_blocks(k=1)' -> 'bitfit_or_last_blocks_k=1'."""
  words = {'|': ' or ', '&': ' and ', '+': ' plus ', '-': ' minus '}
  text = re.sub(r'[|&+]|(?<!\d[eE])-', lambda m: words[m.group()], re.sub('[\'"]', '', plan))
  text = re.sub(r'[^A-Za-z0-9.=-]+', '_', text.replace('_', ' ')).strip('_.')
  return text if len(text) <= 80 else f'{text[:70]}_{zlib.crc32(plan.encode()):08x}'


def parse_config(main_flags: list[str]):
  """The config that `python -m ftlab.main` builds from these `--config...` flags."""
  argv = ['sweep'] + [f for f in main_flags if f.startswith('--config')]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, '', values, lock_config=True, sys_argv=argv)
  try:
    cli.parse(argv, values)
  except InputError as e:
    raise BadInput(f'bad config {shlex.join(argv[1:])}: {e}') from None
  return values.config


def load_grid(args: argparse.Namespace, overrides: list[str] | None) -> dict:
  """The grid: the --grid file's fields, then the flags given.

  Raises:
    BadInput: a --grid file that is missing, not Python or has unknown fields; no base config;
      no plan or seed.
  """
  grid = dict(config='', pretrain='', overrides=[], plans=[], seeds=[0], lrs=[], baseline='')
  if args.grid:
    path, _, arg = args.grid.partition(':')
    try:
      spec = importlib.util.spec_from_file_location('sweep_grid', path)
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      from_file = dict(module.get_sweep(arg or None))
    except (OSError, SyntaxError) as e:  # a file that is missing or not Python; an error
      # inside its get_sweep is the grid's own bug and keeps its traceback
      last = run_pool.last_line(str(e))
      raise BadInput(f'bad --grid {args.grid}: {type(e).__name__}: {last}') from e
    if set(from_file) - set(grid):
      raise BadInput(f'--grid {args.grid}: unknown fields {sorted(set(from_file) - set(grid))}')
    grid.update(from_file)
  given = dict(vars(args), overrides=overrides)
  grid.update({k: given[k] for k in grid if given.get(k) is not None})
  grid = {k: v if isinstance(v, str) else list(dict.fromkeys(v)) for k, v in grid.items()}
  if not grid['config']:
    raise BadInput('no base config: give --config or --grid')
  if not grid['plans'] or not grid['seeds']:
    raise BadInput('empty grid: give at least one plan and one seed')
  return grid


def _json_value(value):
  """A config value as JSON data (the driver turns lists back into tuples where it needs)."""
  if isinstance(value, tuple):
    return [_json_value(v) for v in value]
  if hasattr(value, 'to_dict'):
    return value.to_dict()
  return value


def make_study(grid: dict, workdir: str) -> dict:
  """The study that runs `grid`: one task, one plan per (expression, rate), no selection.

  Raises:
    BadInput: a bad base config or override, or a --baseline that is not one of the plans.
  """
  config = parse_config([f'--config={grid["config"]}', *grid['overrides']])
  overrides = []
  for flag in grid['overrides']:
    dotted = flag.split('=', 1)[0].removeprefix('--config.')
    node = config
    for key in dotted.split('.'):
      node = node[key]
    overrides.append([dotted, _json_value(node)])
  if grid['pretrain']:
    parse_config([f'--config={grid["pretrain"]}'])
    overrides.append(['init.checkpoint', os.path.join(workdir, 'source')])
  lrs = grid['lrs'] or [config.optimizer.learning_rate]
  plans = {}
  for expression in grid['plans']:
    for lr in lrs:
      name = slug(expression) + (f'-lr{lr:g}' if len(lrs) > 1 else '')
      at = f' (lr {lr:g})' if len(lrs) > 1 else ''
      if name in plans:
        other = plans[name]['expression']
        raise BadInput(f'plans {expression!r} and {other!r} would share the directory {name}')
      plans[name] = dict(
        policy=expression.replace('{', '{{').replace('}', '}}'),  # no step placeholders
        expression=expression,
        label=f'`{expression}`{at}'.replace('|', '\\|'),  # a bare pipe would end a cell
        family=f'{expression}{at}',  # the plot's series
        learning_rates=[float(lr)],
      )
  baseline = grid['baseline']
  keys = [k for k, p in plans.items() if p['expression'] == baseline]
  if baseline and len(keys) != 1:
    raise BadInput(
      f'--baseline {baseline!r}: '
      + ('give one --lrs with a baseline' if keys else f'not one of the plans {grid["plans"]}')
    )
  task = os.path.splitext(os.path.basename(grid['config'].partition(':')[0]))[0]
  return dict(
    base=grid['config'],
    overrides=overrides,
    tasks={task: {}},
    plans=plans,
    seeds=[int(s) for s in grid['seeds']],
    learning_rates=[float(lrs[0])],
    minival=config.dataset.get('minival', ''),
    baseline=keys[0] if keys else '',
    lr_source="the sweep's grid: each rate given runs on every seed",
  )


def check_same_sweep(grid: dict, workdir: str) -> None:
  """Raises BadInput when `workdir` holds a sweep of another base config, pretraining config
  or overrides (its runs are not this sweep's)."""
  saved = run_pool.read_json(os.path.join(workdir, GRID_FILE))
  for key in ('config', 'pretrain') if saved else ():
    if saved[key] != grid[key]:
      raise BadInput(f'{workdir} holds a sweep with {key} {saved[key]!r}, not {grid[key]!r}')
  if saved and saved['overrides'] != grid['overrides']:
    new = [o for o in grid['overrides'] if o not in saved['overrides']]
    gone = [o for o in saved['overrides'] if o not in grid['overrides']]
    raise BadInput(
      f'{workdir} holds a sweep run with other overrides: '
      + '; '.join(
        [f'new {" ".join(new)}'] * bool(new) + [f'was {" ".join(gone)}'] * bool(gone)
        or [f'same overrides in another order: {" ".join(saved["overrides"])}']
      )
      + "; its runs are not this sweep's: use another --workdir"
    )


def record(grid: dict, sweep_study: dict, workdir: str) -> str:
  """Writes `sweep.json` (the grid, its plans, seeds and lrs merged with the earlier ones of
  this directory) and the study (`sweep_study.json`, its plans merged the same way, so the
  report covers every run made here); returns the study file's path."""
  path = os.path.join(workdir, GRID_FILE)
  saved = run_pool.read_json(path)
  merged = {k: list(dict.fromkeys(saved.get(k, []) + grid[k])) for k in ('plans', 'seeds', 'lrs')}
  storage.write_whole(path, json.dumps({**grid, **merged}, indent=2) + '\n')
  study_path = os.path.join(workdir, STUDY_FILE)
  earlier = run_pool.read_json(study_path)
  if earlier:
    sweep_study = dict(
      sweep_study,
      plans={**earlier['plans'], **sweep_study['plans']},
      seeds=list(dict.fromkeys(earlier['seeds'] + sweep_study['seeds'])),
    )
  storage.write_whole(study_path, json.dumps(sweep_study, indent=2) + '\n')
  return study_path


def ftlab_main(main_flags: list[str]) -> list[str]:
  return [sys.executable, '-m', 'ftlab.main', *main_flags]


def pretrain(grid: dict, workdir: str, index: int, source_fn=ftlab_main) -> int:
  """Trains the source model once, in share 0 (the others wait for it); its exit code."""
  source = os.path.join(workdir, 'source')
  while not storage.path(f'{source}/summary.json').exists():
    if index == 0:
      argv = source_fn([f'--config={grid["pretrain"]}', f'--workdir={source}'])
      return run_pool.run_all([run_pool.Launch(argv, source, 'source')])[0]
    code = run_pool.returncode(source)
    if code:  # share 0's pretraining failed
      return code
    time.sleep(10)
  return 0


CSV_FIELDS = (
  'plan',
  'seed',
  'lr',
  'status',
  'final_accuracy',
  'trainable_params',
  'trainable_percent',
  'step_flops',
  'wall_time_sec',
  'workdir',
)


def results_csv(report: dict, workdir: str) -> str:
  """One row per run of the study (done, failed or pending), in plan, seed order."""
  sweep_study = report['study']
  done = {(r['plan'], r['lr'], r['seed']): r for r in report['runs']}
  failed = {(f['plan'], f['lr'], f['seed']) for f in report['failed']}
  text = io.StringIO()
  writer = csv.DictWriter(text, CSV_FIELDS, lineterminator='\n')
  writer.writeheader()
  for task in sweep_study['tasks']:
    for plan, about in sweep_study['plans'].items():
      lr = study_report.learning_rates(sweep_study, plan)[0]
      for seed in sweep_study['seeds']:
        row = done.get((plan, lr, seed), {})
        status = 'done' if row else 'failed' if (plan, lr, seed) in failed else 'pending'
        values = dict(
          plan=about['expression'],
          seed=seed,
          lr=lr,
          status=status,
          final_accuracy=row.get('accuracy', {}).get('test'),
          trainable_params=row.get('trainable_parameters'),
          trainable_percent=row.get('trainable_percent'),
          step_flops=row.get('train_step_flops'),
          wall_time_sec=row.get('wall_time_sec'),
          workdir=study_report.run_directory(workdir, task, plan, lr, seed),
        )
        writer.writerow({k: '' if v is None else v for k, v in values.items()})
  return text.getvalue()


def write_results(workdir: str, readme: str = '', report: dict | None = None) -> tuple[dict, str]:
  """The driver's report of the sweep (`report`: one the driver has just written, else it is
  written here) and `results.csv`; with `readme`, its sweep-results section and
  `docs/sweep-results_*.png`. Returns the report and report.md's text."""
  report = report or study_report.write(workdir)
  storage.write_whole(os.path.join(workdir, 'results.csv'), results_csv(report, workdir))
  text = storage.path(os.path.join(workdir, study_report.MARKDOWN)).read_text()
  if readme:
    readme_section.replace(readme, study.readme_markers(SECTION), text.strip())
    study.copy_plots(workdir, readme, SECTION)
  return report, text


class Parser(argparse.ArgumentParser):
  def error(self, message):
    raise BadInput(message)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str] | None]:
  parser = Parser(description='A grid of fine-tuning plans x seeds (x lrs).')
  parser.add_argument('--workdir', required=True, help='the sweep directory')
  parser.add_argument('--grid', help='a grid file path[:arg] whose get_sweep(arg) gives fields')
  parser.add_argument('--config', help='base config of every run: configs/X.py[:args]')
  parser.add_argument('--pretrain', help='config trained once into WORKDIR/source, the init')
  parser.add_argument('--plans', nargs='+', help='plan expressions (config.policy.name)')
  parser.add_argument('--seeds', nargs='+', type=int)
  parser.add_argument('--lrs', nargs='+', type=float, help='learning rates (default: config)')
  parser.add_argument('--baseline', help='the plan expression the others are paired with')
  parser.add_argument('--workers', type=int, default=1, help='runs at once')
  parser.add_argument('--shard', default='0/1', help='i/n: run the i-th of n shares of the grid')
  parser.add_argument('--report-only', '--report_only', action='store_true')
  parser.add_argument('--readme', help='README whose sweep-results section gets the report')
  split = argv.index('--') if '--' in argv else len(argv)
  args = parser.parse_args(argv[:split])
  if args.workers < 1:
    raise BadInput(f'--workers {args.workers} is not a positive number')
  return args, argv[split + 1 :] if split < len(argv) else None


def main(argv: list[str], command_fn=study.job_command, source_fn=ftlab_main) -> int:
  """The sweep; returns the exit code (0, 1 if a run failed, 2 for bad input, 128+signal).

  `command_fn(study_spec, root, job)` and `source_fn(flags)` give the command lines of a run
  and of the pretraining (tests put stand-ins there).
  """
  try:
    args, overrides = parse_args(argv)
    workdir = args.workdir
    shard = study.parse_shard(args.shard)
    if args.readme:  # a README without the section fails now, not after the runs
      try:
        readme_section.check(args.readme, study.readme_markers(SECTION))
      except OSError as e:
        raise BadInput(f'--readme {args.readme}: {e.strerror}') from None
    if args.report_only:
      report, text = write_results(workdir, args.readme)
      print(text, end='')
      return 0
    grid = load_grid(args, overrides)
    check_same_sweep(grid, workdir)
    sweep_study = make_study(grid, workdir)
    study.check_runs(sweep_study, workdir)  # every plan on shapes, finished runs unchanged
    spec = record(grid, sweep_study, workdir)
  except InputError as e:
    print(f'error: {e}', file=sys.stderr)
    return EXIT_BAD_INPUT
  try:
    code = pretrain(grid, workdir, shard[0], source_fn) if grid['pretrain'] else 0
    if code:
      print(f'error: pretraining failed (exit {code}): {workdir}/source/log.txt', file=sys.stderr)
      return 1
    report = study.run_study(
      spec, workdir, workers=args.workers, isolate=True, shard=shard, command_fn=command_fn
    )
  except InputError as e:  # a finished run changed under the sweep's feet
    print(f'error: {e}', file=sys.stderr)
    return EXIT_BAD_INPUT
  except KeyboardInterrupt as e:
    write_results(workdir)
    return 128 + (e.args[0] if e.args else signal.SIGINT)
  report, text = write_results(workdir, args.readme, report)  # run_study wrote the report
  print(text, end='')
  return 1 if report['failed'] else 0


if __name__ == '__main__':
  import jax

  jax.config.update('jax_platforms', 'cpu')  # plans are checked on shapes; the GPUs are the runs'
  signal.signal(signal.SIGTERM, study.sigterm_as_interrupt)
  sys.exit(main(sys.argv[1:]))
