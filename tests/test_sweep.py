"""scripts/sweep.py: a grid as a study of the driver: the runs, skipping, shares, failures, bad
input and the reports.

Most tests run the sweep in-process with a stand-in for each run's process (a tiny script that
writes a summary.json where the driver's run lives), so the scheduling and the files are tested
in seconds; one test runs the real thing end to end.
"""

import csv
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'scripts'))

import run_pool  # noqa: E402
import study_report  # noqa: E402
import sweep  # noqa: E402

BASE = f'{ROOT}/configs/demo.py:stage=finetune,runlocal'
HAS_DATA = os.path.exists('/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz')

# Stands in for a run's process: a study job (`--job`) or ftlab.main (the pretraining).
# Accuracy from the plan and seed; seed 13 crashes.
FAKE_RUN = """
import json, os, sys
sys.path.insert(0, {scripts!r})
import study_report
flags = dict(a[2:].split('=', 1) for a in sys.argv[1:])
if 'job' in flags:
  job = json.loads(flags['job'])
  directory = study_report.run_directory(flags['workdir'], job['task'], job['plan'], job['lr'],
                                         job['seed'])
  about = json.load(open(flags['study']))['plans'][job['plan']]
  seed, probe = job['seed'], about['expression'] == 'linear_probe'
else:  # the pretraining
  directory, seed, probe = flags['workdir'], 0, False
print('starting', directory)
if seed == 13:
  sys.exit('error: seed 13 crashed')
accuracy = (0.5 if probe else 0.7) + 0.1 * seed
os.makedirs(directory, exist_ok=True)
with open(os.path.join(directory, 'summary.json'), 'w') as f:
  json.dump({{'final_eval_accuracy': accuracy, 'trainable_parameters': 100 if probe else 2000,
             'total_parameters': 4000, 'trainable_percent': 2.5 if probe else 50.0,
             'train_step_flops': 2.5e9, 'wall_time_sec': 1.0, 'steps': 3,
             'train_step_memory': {{'total': 1000}}}}, f)
"""


@pytest.fixture
def fake(tmp_path, monkeypatch):
  """Command makers for the sweep: each launch is recorded; no delta file is measured."""
  script = tmp_path / 'fake_run.py'
  script.write_text(FAKE_RUN.format(scripts=os.path.join(ROOT, 'scripts')))
  launched = []

  def command_fn(spec, root, job):
    launched.append(job)
    return [
      sys.executable,
      str(script),
      f'--study={spec}',
      f'--workdir={root}',
      '--job=' + (json.dumps(job.__dict__)),
    ]

  def source_fn(main_flags):
    launched.append('source')
    return [sys.executable, str(script), *main_flags]

  import study

  monkeypatch.setattr(study, 'record_delta_size', lambda directory: {})
  command_fn.launched = launched
  command_fn.source_fn = source_fn
  return command_fn


def read_csv(workdir):
  with open(workdir / 'results.csv') as f:
    return list(csv.DictReader(f))


def test_grid_results_skip_and_report_only(tmp_path, fake, capsys):
  workdir = tmp_path / 'sweep'
  plans = ['linear_probe', 'bitfit | last_blocks(k=1)']
  argv = ['--workdir', str(workdir), '--config', BASE, '--plans', *plans, '--seeds', '0', '1']
  argv += ['--baseline', 'linear_probe']
  assert sweep.main(argv, fake) == 0
  assert sorted((j.plan, j.seed) for j in fake.launched) == sorted(
    (sweep.slug(p), s) for p in plans for s in (0, 1)
  )
  rows = read_csv(workdir)
  assert [(r['plan'], r['seed'], r['status'], r['lr']) for r in rows] == [
    (p, s, 'done', '0.02') for p in plans for s in '01'
  ]
  run = workdir / 'runs/demo/bitfit_or_last_blocks_k=1/lr0.02/seed1'
  assert rows[3]['workdir'] == str(run)
  assert float(rows[3]['final_accuracy']) == pytest.approx(0.8)
  assert rows[3]['trainable_params'] == '2000' and rows[3]['step_flops'] == '2500000000.0'
  assert json.loads((run / run_pool.PROCESS_RECORD).read_text())['returncode'] == 0
  assert 'starting' in (run / run_pool.LOG).read_text()
  report = json.loads((workdir / 'report.json').read_text())
  assert len(report['runs']) == 4 and report['failed'] == []
  table = (workdir / 'report.md').read_text()
  # The driver's table: mean ± std, the t interval and n; the pair with the baseline.
  assert '| `linear_probe` | 55.0 ± 7.1 (95% CI [' in table
  assert '| `bitfit \\| last_blocks(k=1)` |' in table
  [pair] = report['paired']
  assert pair['mean'] == pytest.approx(0.2) and pair['n'] == 2
  assert (workdir / 'accuracy_vs_params.png').read_bytes()[:4] == b'\x89PNG'

  # The same command again: every run is complete, nothing is started.
  assert sweep.main(argv, fake) == 0
  assert len(fake.launched) == 4
  assert 'test: 4 runs, 4 in this share, 0 to run' in capsys.readouterr().out

  for name in ('results.csv', 'report.md', 'report.json'):
    (workdir / name).unlink()
  assert sweep.main(['--workdir', str(workdir), '--report-only'], fake) == 0
  assert len(fake.launched) == 4 and read_csv(workdir) == rows
  assert (workdir / 'report.md').read_text() == table

  # --readme replaces the marked section with the report and copies the plots to docs/.
  readme = tmp_path / 'README.md'
  readme.write_text('top\n<!-- sweep-results:start -->\nold\n<!-- sweep-results:end -->\nend\n')
  assert sweep.main(['--workdir', str(workdir), '--report-only', '--readme', str(readme)]) == 0
  assert readme.read_text() == (
    f'top\n<!-- sweep-results:start -->\n{table.strip()}\n<!-- sweep-results:end -->\nend\n'
  )
  assert (tmp_path / 'docs' / 'sweep-results_heatmap.png').read_bytes()[:4] == b'\x89PNG'
  (tmp_path / 'NO_SECTION.md').write_text('nothing here\n')
  argv_bad = ['--workdir', str(workdir), '--readme', str(tmp_path / 'NO_SECTION.md')]
  assert sweep.main(argv_bad + ['--report-only'], fake) == 2


def test_shares_cover_the_grid_and_failures_do_not_stop_it(tmp_path, fake, capsys):
  workdir = tmp_path / 'sweep'
  argv = ['--workdir', str(workdir), '--config', BASE, '--plans', 'bitfit', '--seeds', '0', '13']
  argv += ['1', '--lrs', '0.01', '0.1', '--workers', '2']
  codes = [sweep.main(argv + ['--shard', f'{i}/2'], fake) for i in range(2)]
  assert codes == [1, 1]  # each share holds a run of seed 13, which crashes, and others
  runs = sorted((j.seed, j.lr) for j in fake.launched)
  assert runs == sorted((s, lr) for s in (0, 1, 13) for lr in (0.01, 0.1))
  rows = read_csv(workdir)
  assert [(r['lr'], r['seed'], r['status']) for r in rows] == [
    (lr, s, 'failed' if s == '13' else 'done') for lr in ('0.01', '0.1') for s in ('0', '13', '1')
  ]
  failed = workdir / 'runs/demo/bitfit-lr0.1/lr0.1/seed13'
  assert json.loads((failed / run_pool.PROCESS_RECORD).read_text())['returncode'] == 1
  assert 'seed 13 crashed' in (failed / run_pool.LOG).read_text()
  out = capsys.readouterr().out
  assert 'runs/demo/bitfit-lr0.1/lr0.1/seed13: FAILED (exit 1): error: seed 13 crashed' in out
  table = (workdir / 'report.md').read_text()
  assert '| `bitfit` (lr 0.1) | 75.0 ± 7.1 (95% CI [' in table
  log = workdir / 'runs/demo/bitfit-lr0.01/lr0.01/seed13/log.txt'
  assert f'- demo / `bitfit` (lr 0.01), lr 0.01, seed 13: exit 1 ({log})' in table
  # The same command retries the failed runs only.
  assert sweep.main(argv + ['--workers', '1'], fake) == 1
  assert sorted(j.seed for j in fake.launched[6:]) == [13, 13]


def test_pretrain_runs_once_and_initialises_every_run(tmp_path, fake):
  workdir = tmp_path / 'sweep'
  argv = ['--workdir', str(workdir), '--config', BASE, '--plans', 'full', '--seeds', '0', '1']
  argv += ['--pretrain', f'{ROOT}/configs/demo.py:stage=pretrain,runlocal']
  argv += ['--', '--config.num_train_steps=3']
  assert sweep.main(argv, fake, fake.source_fn) == 0
  assert fake.launched[0] == 'source' and len(fake.launched) == 3
  assert (workdir / 'source' / 'summary.json').exists()
  sweep_study = json.loads((workdir / sweep.STUDY_FILE).read_text())
  assert sweep_study['overrides'] == [
    ['num_train_steps', 3],
    ['init.checkpoint', str(workdir / 'source')],
  ]
  import study

  config = study.run_config(sweep_study, study.Job('demo', 'full', 1, 0.02), str(workdir))
  assert config.init.checkpoint == str(workdir / 'source') and config.num_train_steps == 3
  assert sweep.main(argv, fake, fake.source_fn) == 0
  assert len(fake.launched) == 3


@pytest.mark.parametrize(
  'extra, message',
  [
    (['--plans', 'no_such_plan'], "error: task 'demo', plan 'no_such_plan': "),
    (
      ['--plans', 'bitfit', 'last_blocks(k=99)'],
      "error: task 'demo', plan 'last_blocks_k=99' (last_blocks(k=99)): policy last_blocks: k=99",
    ),
    (['--plans', 'bitfit', '--shard', '2/2'], "error: --shard '2/2' is not i/n with 0 <= i < n"),
    (['--plans', 'bitfit', '--seeds'], 'error: argument --seeds: expected at least one'),
    (['--plans', 'bitfit', '--', '--config.nope=1'], 'error: bad config '),
    (['--plans', 'bitfit', '--baseline', 'full'], "error: --baseline 'full': not one of"),
    (['--grid', 'GRID'], 'error: empty grid: give at least one plan and one seed'),
  ],
)
def test_bad_input_is_one_line_and_runs_nothing(tmp_path, fake, capsys, extra, message):
  grid = tmp_path / 'grid.py'
  grid.write_text('def get_sweep(arg):\n  return {"plans": []}\n')
  extra = [str(grid) if a == 'GRID' else a for a in extra]
  argv = ['--workdir', str(tmp_path / 'sweep'), '--config', BASE, *extra]
  assert sweep.main(argv, fake) == 2
  err = capsys.readouterr().err
  assert err.startswith(message) and err.count('\n') == 1, err
  assert not fake.launched and not (tmp_path / 'sweep').exists()


def test_slugs_and_worker_shares():
  assert sweep.slug('bitfit | last_blocks(k=1)') == 'bitfit_or_last_blocks_k=1'
  assert sweep.slug('fisher(1e-3) & blocks([4, 5])') == 'fisher_1e-3_and_blocks_4_5'
  assert sweep.slug('full - bitfit') == 'full_minus_bitfit'
  assert len(sweep.slug('regex(["' + 'a' * 200 + '"])')) <= 80
  gpus = [e['CUDA_VISIBLE_DEVICES'] for e, _ in run_pool.worker_slots(2, ['0', '1', '2', '3'])]
  assert gpus == ['0,1', '2,3']
  shared = run_pool.worker_slots(3, ['0'])
  assert {e['CUDA_VISIBLE_DEVICES'] for e, _ in shared} == {'0'}
  assert shared[0][0]['XLA_PYTHON_CLIENT_MEM_FRACTION'] == '0.30'
  cores = [c for _, c in run_pool.worker_slots(2, [])]
  assert all(cores) and not set(cores[0]) & set(cores[1]) or len(os.sched_getaffinity(0)) == 1


@pytest.mark.slow  # a real run through the CLI
@pytest.mark.skipif(not HAS_DATA, reason='needs the dataset-fashion-mnist package')
def test_end_to_end(tmp_path):
  """One real run through the command line: the sweep, the driver, the run's own process."""
  workdir = tmp_path / 'sweep'
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one CPU device
  argv = [sys.executable, f'{ROOT}/scripts/sweep.py', '--workdir', str(workdir), '--config', BASE]
  argv += ['--plans', 'bitfit | last_blocks(1)', '--seeds', '3']
  argv += ['--', '--config.num_train_steps=2', '--config.dataset.eval_split=test[:2%]']
  out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout + out.stderr
  [row] = read_csv(workdir)
  assert (row['plan'], row['seed'], row['status']) == ('bitfit | last_blocks(1)', '3', 'done')
  assert float(row['step_flops']) > 0 and 0 < float(row['trainable_percent']) < 100
  run = workdir / 'runs/demo/bitfit_or_last_blocks_1/lr0.02/seed3'
  summary = json.loads((run / 'summary.json').read_text())
  assert summary['trainable_parameters'] == int(row['trainable_params'])
  assert summary['steps'] == 2 and 'Traceback' not in (run / run_pool.LOG).read_text()
  report = json.loads((workdir / 'report.json').read_text())
  assert report['runs'][0]['masked_delta_bytes'] > 0  # measured on the finished run


@pytest.mark.parametrize('arg', ['', ':runlocal'])
def test_demo_grid_is_valid(tmp_path, monkeypatch, arg):
  monkeypatch.chdir(ROOT)  # the grid names its configs from the repository root
  args, overrides = sweep.parse_args(
    ['--workdir', str(tmp_path), '--grid', f'configs/sweep_demo.py{arg}']
  )
  grid = sweep.load_grid(args, overrides)
  sweep_study = sweep.make_study(grid, str(tmp_path))
  import study

  study.check_runs(sweep_study, str(tmp_path))  # every plan builds on the model's shapes
  assert len(sweep_study['plans']) * len(sweep_study['seeds']) >= 12
  assert study_report.learning_rates(sweep_study, 'full') == [0.02]
