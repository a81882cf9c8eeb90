"""scripts/sweep.py: the grid, skipping, shares, failures, bad input and the reports.

Most tests run the sweep in-process with a stand-in for `python -m ftlab.main` (a tiny script
that writes a summary.json), so the scheduling and the files are tested in seconds; one test
runs the real thing end to end.
"""

import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = f'{ROOT}/configs/demo.py:stage=finetune,runlocal'
HAS_DATA = os.path.exists('/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz')

spec = importlib.util.spec_from_file_location('sweep_script', f'{ROOT}/scripts/sweep.py')
sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sweep)

# Stands in for ftlab.main: accuracy from the plan and seed; seed 13 crashes.
FAKE_MAIN = """
import json, os, sys
flags = dict(a[2:].split('=', 1) for a in sys.argv[1:])
seed = int(flags.get('config.seed', 0))
if seed == 13:
  sys.exit('error: seed 13 crashed')
probe = flags.get('config.policy.name') == 'linear_probe'
accuracy = (0.5 if probe else 0.7) + 0.1 * seed
os.makedirs(flags['workdir'], exist_ok=True)
with open(os.path.join(flags['workdir'], 'config.json'), 'w') as f:
  json.dump({'optimizer': {'learning_rate': 0.02}}, f)
with open(os.path.join(flags['workdir'], 'summary.json'), 'w') as f:
  json.dump({'final_eval_accuracy': accuracy, 'best_eval_accuracy': accuracy + 0.01,
             'trainable_parameters': 100 if probe else 2000, 'total_parameters': 4000,
             'trainable_percent': 2.5 if probe else 50.0, 'train_step_flops': 2.5e9,
             'wall_time_sec': 1.0}, f)
"""


@pytest.fixture
def fake_main(tmp_path):
  script = tmp_path / 'fake_main.py'
  script.write_text(FAKE_MAIN)
  launched = []

  def command_fn(main_flags):
    launched.append(dict(f[2:].split('=', 1) for f in main_flags))
    return [sys.executable, str(script), *main_flags]

  command_fn.launched = launched
  return command_fn


def read_csv(workdir):
  with open(workdir / 'results.csv') as f:
    return list(csv.DictReader(f))


def test_grid_results_skip_and_report_only(tmp_path, fake_main, capsys):
  workdir = tmp_path / 'sweep'
  plans = ['linear_probe', 'bitfit | last_blocks(k=1)']
  argv = ['--workdir', str(workdir), '--config', BASE, '--plans', *plans, '--seeds', '0', '1']
  assert sweep.main(argv, fake_main) == 0
  assert [(f['config.policy.name'], f['config.seed']) for f in fake_main.launched] == [
    (p, s) for p in plans for s in '01'
  ]
  rows = read_csv(workdir)
  assert [(r['plan'], r['seed'], r['status'], r['lr']) for r in rows] == [
    (p, s, 'done', '0.02') for p in plans for s in '01'
  ]
  assert rows[3]['workdir'] == str(workdir / 'bitfit_or_last_blocks_k=1-seed1')
  assert float(rows[3]['final_accuracy']) == pytest.approx(0.8)
  assert rows[3]['trainable_params'] == '2000' and rows[3]['step_flops'] == '2500000000.0'
  info = json.loads((workdir / 'bitfit_or_last_blocks_k=1-seed1/sweep_run.json').read_text())
  assert info['plan'] == plans[1] and info['seed'] == 1 and info['returncode'] == 0
  table = (workdir / 'results.md').read_text()
  assert '4 of 4 runs done' in table
  assert '| `linear_probe` | 0.02 | 2/2 | 55.00 ± 7.07 | 56.00 ± 7.07 | 100 | 2.50 | 2.5 |' in table
  assert '| `bitfit \\| last_blocks(k=1)` | 0.02 | 2/2 | 75.00 ± 7.07 |' in table
  assert (workdir / 'results.png').read_bytes()[:4] == b'\x89PNG'

  # The same command again: every run is complete, nothing is started.
  assert sweep.main(argv, fake_main) == 0
  assert len(fake_main.launched) == 4
  assert '0 to run' in capsys.readouterr().out

  for name in ('results.csv', 'results.md', 'results.png'):
    (workdir / name).unlink()
  assert sweep.main(['--workdir', str(workdir), '--report-only'], fake_main) == 0
  assert len(fake_main.launched) == 4 and read_csv(workdir) == rows
  assert (workdir / 'results.md').read_text() == table

  # --readme replaces the marked section with the table and copies the plot to docs/.
  readme = tmp_path / 'README.md'
  readme.write_text('top\n<!-- sweep-results:start -->\nold\n<!-- sweep-results:end -->\nend\n')
  assert sweep.main(['--workdir', str(workdir), '--report-only', '--readme', str(readme)]) == 0
  assert readme.read_text() == (
    f'top\n<!-- sweep-results:start -->\n{table.rstrip()}\n<!-- sweep-results:end -->\nend\n'
  )
  assert (tmp_path / 'docs' / 'sweep_results.png').read_bytes()[:4] == b'\x89PNG'
  (tmp_path / 'NO_SECTION.md').write_text('nothing here\n')
  argv_bad = ['--workdir', str(workdir), '--readme', str(tmp_path / 'NO_SECTION.md')]
  assert sweep.main(argv_bad + ['--report-only'], fake_main) == 2


def test_shares_cover_the_grid_and_failures_do_not_stop_it(tmp_path, fake_main):
  workdir = tmp_path / 'sweep'
  argv = ['--workdir', str(workdir), '--config', BASE, '--plans', 'bitfit', '--seeds', '0', '13']
  argv += ['1', '--lrs', '0.01', '0.1', '--workers', '2']
  codes = [sweep.main(argv + ['--shard', f'{i}/2'], fake_main) for i in range(2)]
  assert codes == [1, 1]  # each share holds a run of seed 13, which crashes, and others
  runs = [(f['config.seed'], f['config.optimizer.learning_rate']) for f in fake_main.launched]
  assert sorted(runs) == sorted((s, lr) for s in ('0', '1', '13') for lr in ('0.01', '0.1'))
  rows = read_csv(workdir)
  assert [(r['lr'], r['seed'], r['status']) for r in rows] == [
    (lr, s, 'failed' if s == '13' else 'done') for lr in ('0.01', '0.1') for s in ('0', '13', '1')
  ]
  info = json.loads((workdir / 'bitfit-seed13-lr0.1/sweep_run.json').read_text())
  assert info['returncode'] == 1
  assert 'seed 13 crashed' in (workdir / 'bitfit-seed13-lr0.1/log.txt').read_text()
  table = (workdir / 'results.md').read_text()
  assert '| `bitfit` | 0.1 | 2/3 (1 failed) | 75.00 ± 7.07 |' in table
  assert f'- failed (exit 1): {workdir}/bitfit-seed13-lr0.01/log.txt' in table


def test_pretrain_runs_once_and_initialises_every_run(tmp_path, fake_main):
  workdir = tmp_path / 'sweep'
  argv = ['--workdir', str(workdir), '--config', BASE, '--plans', 'full', '--seeds', '0', '1']
  argv += ['--pretrain', f'{ROOT}/configs/demo.py:stage=pretrain,runlocal']
  argv += ['--', '--config.num_train_steps=3']
  assert sweep.main(argv, fake_main) == 0
  source, *runs = fake_main.launched
  assert source['workdir'] == str(workdir / 'source') and 'config.seed' not in source
  assert all(r['config.init.checkpoint'] == str(workdir / 'source') for r in runs)
  assert all(r['config.num_train_steps'] == '3' for r in runs) and len(runs) == 2
  assert sweep.main(argv, fake_main) == 0
  assert len(fake_main.launched) == 3


@pytest.mark.parametrize(
  'extra, message',
  [
    (['--plans', 'no_such_plan'], "error: plan 'no_such_plan': "),
    (['--plans', 'bitfit', 'last_blocks(k=99)'], "error: plan 'last_blocks(k=99)': "),
    (['--plans', 'bitfit', '--shard', '2/2'], "error: --shard '2/2' is not i/n with 0 <= i < n"),
    (['--plans', 'bitfit', '--seeds'], 'error: argument --seeds: expected at least one'),
    (['--plans', 'bitfit', '--', '--config.nope=1'], 'error: bad config '),
    (['--grid', 'GRID'], 'error: empty grid: give at least one plan and one seed'),
  ],
)
def test_bad_input_is_one_line_and_runs_nothing(tmp_path, fake_main, capsys, extra, message):
  grid = tmp_path / 'grid.py'
  grid.write_text('def get_sweep(arg):\n  return {"plans": []}\n')
  extra = [str(grid) if a == 'GRID' else a for a in extra]
  argv = ['--workdir', str(tmp_path / 'sweep'), '--config', BASE, *extra]
  assert sweep.main(argv, fake_main) == 2
  err = capsys.readouterr().err
  assert err.startswith(message) and err.count('\n') == 1, err
  assert not fake_main.launched and not (tmp_path / 'sweep').exists()


def test_slugs_and_worker_shares():
  assert sweep.slug('bitfit | last_blocks(k=1)') == 'bitfit_or_last_blocks_k=1'
  assert sweep.slug('fisher(1e-3) & blocks([4, 5])') == 'fisher_1e-3_and_blocks_4_5'
  assert sweep.slug('full - bitfit') == 'full_minus_bitfit'
  assert len(sweep.slug('regex(["' + 'a' * 200 + '"])')) <= 80
  gpus = [e['CUDA_VISIBLE_DEVICES'] for e, _ in sweep.worker_slots(2, ['0', '1', '2', '3'])]
  assert gpus == ['0,1', '2,3']
  shared = sweep.worker_slots(3, ['0'])
  assert {e['CUDA_VISIBLE_DEVICES'] for e, _ in shared} == {'0'}
  assert shared[0][0]['XLA_PYTHON_CLIENT_MEM_FRACTION'] == '0.30'
  cores = [c for _, c in sweep.worker_slots(2, [])]
  assert all(cores) and not set(cores[0]) & set(cores[1]) or len(os.sched_getaffinity(0)) == 1


@pytest.mark.slow  # a real run through the CLI
@pytest.mark.skipif(not HAS_DATA, reason='needs the dataset-fashion-mnist package')
def test_end_to_end(tmp_path):
  """One real run of ftlab.main through the command line (about 35 s on 2 cores)."""
  workdir = tmp_path / 'sweep'
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one CPU device
  argv = [sys.executable, f'{ROOT}/scripts/sweep.py', '--workdir', str(workdir), '--config', BASE]
  argv += ['--plans', 'bitfit | last_blocks(1)', '--seeds', '3']
  argv += ['--', '--config.num_train_steps=2', '--config.dataset.eval_split=test[:2%]']
  out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout + out.stderr
  [row] = read_csv(workdir)
  assert (row['plan'], row['seed'], row['status']) == ('bitfit | last_blocks(1)', '3', 'done')
  assert float(row['step_flops']) > 0 and 0 < float(row['trainable_percent']) < 100
  summary = json.loads((workdir / 'bitfit_or_last_blocks_1-seed3/summary.json').read_text())
  assert summary['trainable_parameters'] == int(row['trainable_params'])
  assert '| `bitfit \\| last_blocks(1)` | 0.02 | 1/1 |' in (workdir / 'results.md').read_text()


@pytest.mark.parametrize('arg', ['', ':runlocal'])
def test_demo_grid_is_valid(tmp_path, monkeypatch, arg):
  monkeypatch.chdir(ROOT)  # the grid names its configs from the repository root
  args, overrides = sweep.parse_args(
    ['--workdir', str(tmp_path), '--grid', f'configs/sweep_demo.py{arg}']
  )
  grid = sweep.load_grid(args, overrides)
  runs = sweep.grid_runs(grid)
  sweep.check_grid(grid, runs, str(tmp_path))  # every plan builds on the model's shapes
  assert len(runs) >= 12 and len({r.name for r in runs}) == len(runs)
