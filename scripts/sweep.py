"""Sweeps: a grid of plans x seeds (x learning rates) over one base config, in one directory.

Each run is `python -m ftlab.main` in its own subprocess and run directory:

  # the grid on the command line; --pretrain first trains the source model into WORKDIR/source
  python scripts/sweep.py --workdir workdirs/sweep --config configs/demo.py:stage=finetune \
    --pretrain configs/demo.py:stage=pretrain \
    --plans linear_probe bitfit 'last_blocks(1)' 'bitfit | last_blocks(1)' --seeds 0 1 \
    [--lrs 0.01 0.02] [--workers 2] [-- --config.num_train_steps=300 ...]
  # the grid from a file (get_sweep(arg) returns these flags as a dict); flags given here win
  python scripts/sweep.py --workdir workdirs/sweep_demo --grid configs/sweep_demo.py[:runlocal]
  # one share of the grid per host or process group, into the same (shared) directory
  python scripts/sweep.py --workdir /shared/sweep --grid ... --shard 0/2   # and 1/2 elsewhere
  # the tables and the plot again, from the directory alone (--readme: into README.md too)
  python scripts/sweep.py --workdir workdirs/sweep --report-only [--readme README.md]

Flags after `--` go to every run (not to --pretrain, whose config takes its own arguments).
`--workers N` runs N at once: on a CUDA machine each gets its share of the GPUs
(CUDA_VISIBLE_DEVICES), on a CPU its share of the cores. A run lives in
`<plan slug>-seed<S>[-lr<LR>]`, with `sweep_run.json` (its exact plan, seed, lr, command and
exit code) and `log.txt` beside what ftlab.main writes. A run with a `summary.json` is complete
and skipped; any other is started again, and ftlab.main resumes it from its checkpoints. Every
plan is built on parameter shapes before anything runs: a bad plan, grid or --shard stops the
sweep with one line and exit code 2. A failed run is marked failed in the results; the other
runs go on and the sweep exits 1. Each sweep (or share) ends by writing, over the whole grid,
results.csv (one row per run), results.md (mean ± std over seeds per plan and lr, trainable
share, FLOPs of the compiled train step) and results.png (accuracy against trainable parameters).
"""

import argparse
import contextlib
import csv
import dataclasses
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib

import jax
import plots
import readme_section
import study_tables
from absl import flags
from ml_collections import config_flags

from ftlab import cli
from ftlab import run as ftlab_run
from ftlab.analysis import stats
from ftlab.errors import InputError
from ftlab.files import storage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXIT_BAD_INPUT = 2


class BadInput(InputError):
  """A bad grid, plan or flag: one line and exit code 2, before any run starts."""


@dataclasses.dataclass(frozen=True)
class Run:
  plan: str  # a plan expression, passed through to config.policy.name as it is
  seed: int
  lr: float | None  # None: the base config's learning rate

  @property
  def name(self) -> str:
    return f'{slug(self.plan)}-seed{self.seed}' + ('' if self.lr is None else f'-lr{self.lr:g}')


def slug(plan: str) -> str:
  """A directory name for a plan: 'bitfit | last_blocks(k=1)' -> 'bitfit_or_last_blocks_k=1'."""
  words = {'|': ' or ', '&': ' and ', '+': ' plus ', '-': ' minus '}
  text = re.sub(r'[|&+]|(?<!\d[eE])-', lambda m: words[m.group()], re.sub('[\'"]', '', plan))
  text = re.sub(r'[^A-Za-z0-9.=-]+', '_', text.replace('_', ' ')).strip('_.')
  return text if len(text) <= 80 else f'{text[:70]}_{zlib.crc32(plan.encode()):08x}'


def read_json(path: str) -> dict:
  try:
    return json.loads(storage.path(path).read_text())
  except (FileNotFoundError, json.JSONDecodeError):
    return {}


def write_atomically(path: str, data: str | bytes) -> None:
  """Readers (other shards, --report-only) never see half a file (local or gs://)."""
  storage.write_whole(path, data)


def exists(path: str) -> bool:
  return storage.path(path).exists()


def last_line(text: str) -> str:
  lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
  return lines[-1] if lines else ''


def run_flags(grid: dict, run: Run, workdir: str) -> list[str]:
  """ftlab.main's flags for one run; the grid's own come last, so they win."""
  out = [f'--config={grid["config"]}', *grid['overrides']]
  out += [f'--config.policy.name={run.plan}', f'--config.seed={run.seed}']
  if run.lr is not None:
    out.append(f'--config.optimizer.learning_rate={run.lr!r}')
  if grid['pretrain']:
    out.append(f'--config.init.checkpoint={os.path.join(workdir, "source")}')
  return out + [f'--workdir={os.path.join(workdir, run.name)}']


def parse_config(main_flags: list[str]):
  """The config that `python -m ftlab.main` builds from these flags."""
  argv = ['sweep'] + [f for f in main_flags if f.startswith('--config')]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, '', values, lock_config=True, sys_argv=argv)
  try:
    cli.parse(argv, values)
  except InputError as e:
    raise BadInput(f'bad config {shlex.join(argv[1:])}: {e}') from None
  return values.config


def check_grid(grid: dict, runs: list[Run], workdir: str) -> None:
  """Raises BadInput for an empty grid, a bad config or override, a plan that cannot be built
  on the model's parameter shapes, or two plans in one directory; runs nothing."""
  if not runs:
    raise BadInput('empty grid: give at least one plan and one seed')
  if grid['pretrain']:
    parse_config([f'--config={grid["pretrain"]}'])
  for plan in dict.fromkeys(run.plan for run in runs):
    config = parse_config(run_flags(grid, Run(plan, runs[0].seed, runs[0].lr), workdir))
    try:
      # The class count sizes the head only; it never changes which parameters train.
      ftlab_run.check_plans(config, len(config.dataset.classes) or 10)
    except InputError as e:
      raise BadInput(f'plan {plan!r}: {last_line(str(e))}') from None
  seen = {}
  for run in runs:
    saved = read_json(os.path.join(workdir, run.name, 'sweep_run.json')).get('plan')
    for other in (seen.setdefault(run.name, run.plan), saved):
      if other not in (None, run.plan):
        raise BadInput(f'plans {run.plan!r} and {other!r} would share the directory {run.name}')


def load_grid(args: argparse.Namespace, overrides: list[str] | None) -> dict:
  """The grid: the --grid file's fields, then the flags given."""
  grid = dict(config='', pretrain='', overrides=[], plans=[], seeds=[0], lrs=[])
  if args.grid:
    path, _, arg = args.grid.partition(':')
    try:
      spec = importlib.util.spec_from_file_location('sweep_grid', path)
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      from_file = dict(module.get_sweep(arg or None))
    except (OSError, SyntaxError) as e:  # a file that is missing or not Python; an error
      # inside its get_sweep is the grid's own bug and keeps its traceback
      raise BadInput(f'bad --grid {args.grid}: {type(e).__name__}: {last_line(str(e))}') from e
    if set(from_file) - set(grid):
      raise BadInput(f'--grid {args.grid}: unknown fields {sorted(set(from_file) - set(grid))}')
    grid.update(from_file)
  given = dict(vars(args), overrides=overrides)
  grid.update({k: given[k] for k in grid if given.get(k) is not None})
  grid = {k: v if isinstance(v, str) else list(dict.fromkeys(v)) for k, v in grid.items()}
  grid['lrs'] = grid['lrs'] or [None]
  if not grid['config']:
    raise BadInput('no base config: give --config or --grid')
  return grid


def grid_runs(grid: dict) -> list[Run]:
  return [Run(p, s, lr) for p in grid['plans'] for lr in grid['lrs'] for s in grid['seeds']]


def record_grid(grid: dict, workdir: str) -> None:
  """WORKDIR/sweep.json: the grid, merged with the earlier plans, seeds and lrs of this sweep."""
  path = os.path.join(workdir, 'sweep.json')
  saved = read_json(path)
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
  merged = {k: list(dict.fromkeys(saved.get(k, []) + grid[k])) for k in ('plans', 'seeds', 'lrs')}
  write_atomically(path, json.dumps({**grid, **merged}, indent=2) + '\n')


def worker_slots(workers: int, gpus: list[str]) -> list[tuple[dict, list[int] | None]]:
  """Each worker's environment and CPU set: its share of the GPUs, or else of the cores."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.getenv('PYTHONPATH')])))
  if workers == 1:
    return [(env, None)]

  def share(items, i):  # the i-th of `workers` contiguous shares, or one item if too few
    part = items[i * len(items) // workers : (i + 1) * len(items) // workers]
    return part or [items[i % len(items)]]

  if not gpus:
    cores = sorted(os.sched_getaffinity(0))
    return [
      (dict(env, OMP_NUM_THREADS=str(len(share(cores, i)))), share(cores, i))
      for i in range(workers)
    ]
  per_gpu = -(-workers // len(gpus))  # several runs on one GPU must share its memory
  memory = {'XLA_PYTHON_CLIENT_MEM_FRACTION': f'{0.9 / per_gpu:.2f}'} if per_gpu > 1 else {}
  return [
    (dict(env, CUDA_VISIBLE_DEVICES=','.join(share(gpus, i)), **memory), None)
    for i in range(workers)
  ]


def visible_gpus() -> list[str]:
  """The CUDA devices this process may hand out (none on a machine without nvidia-smi)."""
  if 'CUDA_VISIBLE_DEVICES' in os.environ:
    return [g for g in os.environ['CUDA_VISIBLE_DEVICES'].split(',') if g.strip() not in ('', '-1')]
  query = ['nvidia-smi', '--query-gpu=index', '--format=csv,noheader']
  out = shutil.which(query[0]) and subprocess.run(query, capture_output=True, text=True)
  return out.stdout.split() if out and out.returncode == 0 else []


def ftlab_main(main_flags: list[str]) -> list[str]:
  return [sys.executable, '-m', 'ftlab.main', *main_flags]


def run_all(jobs: list[tuple[dict, list[str]]], slots: list, command_fn=ftlab_main) -> list:
  """Runs jobs (what to record, ftlab.main flags) len(slots) at a time; returns exit codes.

  On SIGINT/SIGTERM each running job is sent SIGTERM (it checkpoints and stops) and awaited.
  """
  codes, running, queue = [None] * len(jobs), {}, list(range(len(jobs)))

  def start(i, slot):
    info, main_flags = jobs[i]
    run_dir = main_flags[-1].split('=', 1)[1]
    argv = command_fn(main_flags)
    write_atomically(f'{run_dir}/sweep_run.json', json.dumps(dict(info, command=shlex.join(argv))))
    env, cpus = slots[slot]
    every_cpu = os.sched_getaffinity(0)
    # The child inherits this thread's CPU set (preexec_fn is unsafe in a threaded process).
    os.sched_setaffinity(0, cpus or every_cpu)
    remote = storage.is_remote(run_dir)
    try:
      # Locally the log is the child's stdout; on an object store the output is collected and
      # appended to the log object when the run ends (an object is written whole).
      with open(f'{run_dir}/log.txt', 'a') if not remote else contextlib.nullcontext() as log:
        out = subprocess.PIPE if remote else log
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, text=True)
    finally:
      os.sched_setaffinity(0, every_cpu)
    output, reader = [], None
    if remote:
      reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
      reader.start()
    running[slot] = (i, proc, time.time(), run_dir, (reader, output))

  def finish(slot):
    i, proc, start_time, run_dir, (reader, output) = running.pop(slot)
    if reader:  # the output read to its end, then appended to the log object
      reader.join()
      storage.append_text(f'{run_dir}/log.txt', ''.join(output))
    codes[i], seconds = proc.returncode, time.time() - start_time
    info = dict(read_json(f'{run_dir}/sweep_run.json'), returncode=codes[i], seconds=seconds)
    write_atomically(f'{run_dir}/sweep_run.json', json.dumps(info, indent=2) + '\n')
    summary = read_json(f'{run_dir}/summary.json')
    if codes[i] == 0 and summary:
      status = f'{100 * summary["final_eval_accuracy"]:.2f}% in {seconds:.0f} s'
    else:
      text = storage.path(f'{run_dir}/log.txt').read_text()
      status = f'FAILED (exit {codes[i]}): {last_line(text[-2000:])} (log: {run_dir}/log.txt)'
    done = sum(c is not None for c in codes)
    print(f'[{done}/{len(jobs)}] {os.path.basename(run_dir)}: {status}', flush=True)

  try:
    while queue or running:
      for slot in [s for s in range(len(slots)) if s not in running][: len(queue)]:
        start(queue.pop(0), slot)
      time.sleep(0.2)
      for slot in [s for s, (_, proc, *_) in running.items() if proc.poll() is not None]:
        finish(slot)
  except KeyboardInterrupt:
    for _, proc, *_ in running.values():
      proc.send_signal(signal.SIGTERM)
    for slot in list(running):
      running[slot][1].wait()
      finish(slot)
    raise
  return codes


def pretrain(grid: dict, workdir: str, index: int, command_fn) -> int:
  """Trains the source model once, in share 0 (the others wait for it); its exit code."""
  source = os.path.join(workdir, 'source')
  while not exists(f'{source}/summary.json'):
    if index == 0:
      job = ({'config': grid['pretrain']}, [f'--config={grid["pretrain"]}', f'--workdir={source}'])
      return run_all([job], worker_slots(1, []), command_fn)[0]
    code = read_json(f'{source}/sweep_run.json').get('returncode')
    if code:  # share 0's pretraining failed
      return code
    time.sleep(10)
  return 0


SUMMARY_FIELDS = {
  'final_accuracy': 'final_eval_accuracy',
  'best_accuracy': 'best_eval_accuracy',
  'trainable_params': 'trainable_parameters',
  'trainable_percent': 'trainable_percent',
  'step_flops': 'train_step_flops',  # XLA's count for the (last stage's) compiled train step
  'wall_time_sec': 'wall_time_sec',
}
CSV_FIELDS = ('plan', 'seed', 'lr', 'status', *SUMMARY_FIELDS, 'workdir')


def collect(workdir: str) -> tuple[dict, list[dict]]:
  """The recorded grid and one row per run of it, from what is in the sweep directory."""
  grid = read_json(os.path.join(workdir, 'sweep.json'))
  if not grid:
    raise BadInput(f'no sweep in {workdir} (no sweep.json)')
  rows = []
  for run in grid_runs(grid):
    run_dir = os.path.join(workdir, run.name)
    summary, info = read_json(f'{run_dir}/summary.json'), read_json(f'{run_dir}/sweep_run.json')
    if 'best_minival_accuracy' in summary:  # model selection on minival
      summary['best_eval_accuracy'] = summary['best_minival_accuracy']
    status = 'done' if summary else 'pending' if info.get('returncode') is None else 'failed'
    config = read_json(f'{run_dir}/config.json')  # the base config's lr, as the run used it
    lr = config.get('optimizer', {}).get('learning_rate') if run.lr is None else run.lr
    rows.append(
      dict(plan=run.plan, seed=run.seed, lr=lr, status=status, workdir=run_dir, run=run)
      | {'returncode': info.get('returncode')}
      | {k: summary.get(v) for k, v in SUMMARY_FIELDS.items()}
    )
  return grid, rows


def groups(rows: list[dict]) -> dict[tuple[str, float | None], list[dict]]:
  """Rows by (plan, lr), in grid order."""
  by_key = {}
  for row in rows:
    by_key.setdefault((row['plan'], row['run'].lr), []).append(row)
  return by_key


def markdown(grid: dict, rows: list[dict]) -> str:
  done = [r for r in rows if r['status'] == 'done']
  lines = [
    f'Sweep of `{" ".join([grid["config"], *grid["overrides"]])}`: {len(done)} of {len(rows)} '
    f'runs done; final and best eval accuracy, mean ± std over seeds '
    f'{", ".join(map(str, grid["seeds"]))}.',
    '',
    '| plan | lr | runs done | final accuracy (%) | best accuracy (%) | trainable params '
    '| trainable % | step GFLOPs |',
    '|---|---:|---:|---:|---:|---:|---:|---:|',
  ]
  for members in groups(rows).values():
    ok = [r for r in members if r['status'] == 'done']
    failed = sum(r['status'] == 'failed' for r in members)
    first = ok[0] if ok else dict.fromkeys(SUMMARY_FIELDS)
    cells = [
      '`{}`'.format(members[0]['plan'].replace('|', '\\|')),  # a bare pipe would end the cell
      '' if members[0]['lr'] is None else f'{members[0]["lr"]:g}',
      f'{len(ok)}/{len(members)}' + (f' ({failed} failed)' if failed else ''),
      study_tables.mean_std([r['final_accuracy'] for r in ok]),
      study_tables.mean_std([r['best_accuracy'] for r in ok if r['best_accuracy'] is not None]),
      '' if first['trainable_params'] is None else f'{first["trainable_params"]:,}',
      '' if first['trainable_percent'] is None else f'{first["trainable_percent"]:.2f}',
      '' if first['step_flops'] is None else f'{first["step_flops"] / 1e9:.4g}',
    ]
    lines.append('| ' + ' | '.join(cells) + ' |')
  failed = [r for r in rows if r['status'] == 'failed']
  lines += [''] * bool(failed)
  lines += [f'- failed (exit {r["returncode"]}): {r["workdir"]}/log.txt' for r in failed]
  return '\n'.join(lines) + '\n'


def plot(rows: list[dict], path: str) -> None:
  """Final accuracy against trainable parameters (log scale), error bars over seeds."""
  several_lrs = len({lr for _, lr in groups(rows)}) > 1
  points = []
  for (plan, lr), members in groups(rows).items():
    ok = [r for r in members if r['status'] == 'done']
    if ok:
      s = stats.summarize([100 * r['final_accuracy'] for r in ok])
      params = stats.summarize([r['trainable_params'] for r in ok]).mean
      # Each (plan, lr) its own series: plans on the same spot stay apart in the legend.
      family = plan + (f' (lr {ok[0]["lr"]:g})' if several_lrs else '')
      points.append(plots.Point('', family, params, s.mean, s.std if s.has_interval else 0.0))
  plots.accuracy_vs_params(
    points,
    path,
    xlabel='trainable parameters (log scale)',
    ylabel='final eval accuracy (%), mean ± std over seeds',
    legend_outside=True,
  )


def write_report(workdir: str) -> str:
  """results.csv, results.md and results.png over the whole recorded grid; returns the table."""
  grid, rows = collect(workdir)
  text = io.StringIO()
  writer = csv.DictWriter(text, CSV_FIELDS, extrasaction='ignore', lineterminator='\n')
  writer.writeheader()
  writer.writerows({k: '' if v is None else v for k, v in row.items()} for row in rows)
  write_atomically(os.path.join(workdir, 'results.csv'), text.getvalue())
  table = markdown(grid, rows)
  write_atomically(os.path.join(workdir, 'results.md'), table)
  plot(rows, os.path.join(workdir, 'results.png'))
  return table


README_MARKERS = ('<!-- sweep-results:start -->', '<!-- sweep-results:end -->')


def check_readme(readme: str) -> None:
  """BadInput unless the README has the sweep-results section."""
  try:
    readme_section.check(readme, README_MARKERS)
  except OSError as e:
    raise BadInput(f'--readme {readme}: {e.strerror}') from None
  except readme_section.ReadmeError as e:
    raise BadInput(str(e)) from None


def update_readme(readme: str, workdir: str, table: str) -> None:
  """Replaces the README's sweep-results section with `table`; the plot goes to docs/."""
  check_readme(readme)
  readme_section.replace(readme, README_MARKERS, table.rstrip())
  docs = os.path.join(os.path.dirname(os.path.abspath(readme)), 'docs')
  os.makedirs(docs, exist_ok=True)
  plot_file = storage.path(os.path.join(workdir, 'results.png')).read_bytes()
  with open(os.path.join(docs, 'sweep_results.png'), 'wb') as f:
    f.write(plot_file)


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
  parser.add_argument('--workers', type=int, default=1, help='runs at once')
  parser.add_argument('--shard', default='0/1', help='i/n: run the i-th of n shares of the grid')
  parser.add_argument('--report-only', '--report_only', action='store_true')
  parser.add_argument('--readme', help='README whose sweep-results section gets the table')
  split = argv.index('--') if '--' in argv else len(argv)
  args = parser.parse_args(argv[:split])
  match = re.fullmatch(r'(\d+)/(\d+)', args.shard)
  if not match or not int(match[1]) < int(match[2]):
    raise BadInput(f'--shard {args.shard!r} is not i/n with 0 <= i < n')
  if args.workers < 1:
    raise BadInput(f'--workers {args.workers} is not a positive number')
  return args, argv[split + 1 :] if split < len(argv) else None


def main(argv: list[str], command_fn=ftlab_main) -> int:
  """The sweep; returns the exit code (0, 1 if a run failed, 2 for bad input, 128+signal)."""
  try:
    args, overrides = parse_args(argv)
    workdir = args.workdir
    if args.readme:
      check_readme(args.readme)  # a README without the section fails now, not after the runs
    if args.report_only:
      table = write_report(workdir)
      if args.readme:
        update_readme(args.readme, workdir, table)
      print(table, end='')
      return 0
    grid = load_grid(args, overrides)
    runs = grid_runs(grid)
    check_grid(grid, runs, workdir)
    record_grid(grid, workdir)
  except BadInput as e:
    print(f'error: {e}', file=sys.stderr)
    return EXIT_BAD_INPUT
  index, count = map(int, args.shard.split('/'))
  mine = runs[index::count]
  todo = [r for r in mine if not exists(os.path.join(workdir, r.name, 'summary.json'))]
  print(f'{len(runs)} runs in the grid, {len(mine)} in this share, {len(todo)} to run', flush=True)
  codes = []
  try:
    code = pretrain(grid, workdir, index, command_fn) if grid['pretrain'] else 0
    if code:
      print(f'error: pretraining failed (exit {code}): {workdir}/source/log.txt', file=sys.stderr)
      return 1
    jobs = [(dataclasses.asdict(r), run_flags(grid, r, workdir)) for r in todo]
    codes = run_all(jobs, worker_slots(args.workers, visible_gpus()), command_fn)
  except KeyboardInterrupt as e:
    write_report(workdir)
    return 128 + (e.args[0] if e.args else signal.SIGINT)
  table = write_report(workdir)
  if args.readme:
    update_readme(args.readme, workdir, table)
  print(table, end='')
  return 1 if any(codes) else 0


def _sigterm_as_interrupt(signum, frame):
  raise KeyboardInterrupt(signum)


if __name__ == '__main__':
  jax.config.update('jax_platforms', 'cpu')  # plans are checked on shapes; the GPUs are the runs'
  signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
  sys.exit(main(sys.argv[1:]))
