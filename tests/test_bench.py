"""scripts/bench.py: the JSON and its fields, FLOPs by plan, the README table, bad input,
and scripts/gpu_check.sh's bench command in its CPU smoke mode."""

import importlib.util
import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location('bench_script', f'{ROOT}/scripts/bench.py')
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

TINY = ['--model', 'vgg11', '--width', '0.0625', '--image-size', '32', '--batch', '8']
TINY += ['--repeats', '2', '--warmup', '1', '--num-classes', '5']
TIMING_FIELDS = ('times_sec', 'median_sec', 'min_sec', 'max_sec', 'iqr_sec', 'images_per_sec')


@pytest.fixture(scope='module')
def tiny_result(tmp_path_factory):
  out = tmp_path_factory.mktemp('bench') / 'bench.json'
  argv = TINY + ['--plans', 'full', 'linear_probe', '--json', str(out)]
  assert bench.main(argv) == 0
  with open(out) as f:
    return json.load(f), str(out)


@pytest.mark.slow  # the bench in a subprocess (shared fixture)
def test_json_has_every_field_for_every_framework(tiny_result):
  result, _ = tiny_result
  assert result['config']['frameworks'] == ['ftlab', 'torch', 'keras']
  res = result['results']['float32']
  for fw in ('ftlab', 'torch', 'keras'):
    for field in TIMING_FIELDS:
      assert field in res['forward'][fw]
    for plan in ('full', 'linear_probe'):
      row = res['plans'][plan][fw]
      assert all(field in row for field in TIMING_FIELDS)
      assert len(row['times_sec']) == 2 and row['step_over_own_forward'] > 0
      if fw != 'torch':
        assert row['step_over_torch'] > 0
  ftlab = res['plans']['full']['ftlab']
  for field in ('compile_sec', 'step_flops', 'param_bytes', 'opt_state_bytes', 'trainable_params'):
    assert ftlab[field] > 0
  assert res['forward']['ftlab']['flops'] > 0
  # Every framework trains the same tensors.
  for plan in ('full', 'linear_probe'):
    counts = {fw: res['plans'][plan][fw]['trainable_params'] for fw in ('ftlab', 'torch', 'keras')}
    assert len(set(counts.values())) == 1, counts


@pytest.mark.slow  # the bench fixture
def test_linear_probe_step_costs_fewer_flops_and_less_state_than_full(tiny_result):
  plans = tiny_result[0]['results']['float32']['plans']
  full, probe = plans['full']['ftlab'], plans['linear_probe']['ftlab']
  assert probe['step_flops'] < full['step_flops']
  assert probe['opt_state_bytes'] < full['opt_state_bytes']
  assert probe['param_bytes'] == full['param_bytes']


@pytest.mark.slow  # the bench fixture
def test_readme_table_is_rewritten_between_markers(tiny_result, tmp_path, capsys):
  readme = tmp_path / 'README.md'
  readme.write_text(f'# x\n\nbefore\n{bench.README_START}\nold table\n{bench.README_END}\nafter\n')
  assert bench.main(['--report-only', tiny_result[1], '--readme', str(readme)]) == 0
  text = readme.read_text()
  assert 'old table' not in text and text.startswith('# x\n\nbefore\n') and text.endswith('after\n')
  table = text.split(bench.README_START)[1].split(bench.README_END)[0]
  assert '| float32 | `full` | ftlab |' in table and '| float32 | `linear_probe` | keras |' in table
  capsys.readouterr()
  readme.write_text('no markers\n')
  assert bench.main(['--report-only', tiny_result[1], '--readme', str(readme)]) == 2
  assert 'markers' in capsys.readouterr().err


@pytest.mark.parametrize(
  'argv, message',
  [
    (['--model', 'vgg17'], 'unknown model'),
    (['--plans', 'full', 'fulll'], 'fulll'),
    (['--frameworks', 'ftlab,mxnet'], 'unknown framework'),
    (['--dtype', 'float16'], 'unknown dtype'),
    (['--plans', 'lp_ft(probe_steps=5)'], 'schedule'),
    (['--repeats', 'x'], 'invalid int'),
  ],
)
def test_bad_input_exits_2_with_one_line(argv, message, capsys):
  assert bench.main(TINY + argv) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and err.startswith('bench.py: error:') and message in err


def test_missing_torch_exits_2(monkeypatch, capsys):
  import builtins

  real_import = builtins.__import__

  def no_torch(name, *args, **kwargs):
    if name == 'torch':
      raise ImportError('no torch')
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, '__import__', no_torch)
  assert bench.main(TINY + ['--frameworks', 'ftlab,torch']) == 2
  assert 'torch is not installed' in capsys.readouterr().err


@pytest.mark.slow  # a subprocess bench
def test_gpu_check_smoke_mode_runs_its_bench_on_cpu(tmp_path):
  env = {**os.environ, 'FTLAB_GPU_CHECK_SMOKE': '1', 'XLA_FLAGS': ''}
  proc = subprocess.run(
    ['bash', f'{ROOT}/scripts/gpu_check.sh', str(tmp_path)],
    env=env,
    capture_output=True,
    text=True,
    timeout=900,  # a hang guard: the script's own limit (600 s in smoke mode) comes first
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(tmp_path / 'bench_gpu.json') as f:
    result = json.load(f)
  assert sorted(result['results']) == ['bfloat16', 'float32']
  for res in result['results'].values():
    assert sorted(res['plans']) == ['full', 'linear_probe']
    assert sorted(res['plans']['full']) == ['ftlab', 'torch']
