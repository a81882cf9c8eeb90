"""Preemption and kills, damaged checkpoints, numerical faults, frozen integrity, bad input."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import default
from ftlab import errors, loop
from ftlab.data import sources
from ftlab.files import checkpoint
from ftlab.files.metric_writers import read_jsonl
from ftlab.plans import policies
from tests.run_files import params_of, plain_vgg11

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [
  pytest.mark.slow,
  pytest.mark.skipif(
    not os.path.isdir(sources.DEBIAN_FASHION_MNIST_DIR),
    reason='Fashion-MNIST IDX files absent: apt-get install dataset-fashion-mnist',
  ),
]
SOAK = [
  '--config.num_train_steps=200',
  '--config.checkpoint_every_steps=10',
  '--config.eval_every_steps=200',
  '--config.log_every_steps=50',
]


def cli(workdir, *overrides):
  return [
    sys.executable,
    '-m',
    'ftlab.main',
    '--config=configs/default.py:runlocal',
    f'--workdir={workdir}',
    *overrides,
  ]


def assert_same_params(a_dir, b_dir):
  a, b = params_of(a_dir), params_of(b_dir)
  assert a.keys() == b.keys()
  for path in a:
    assert a[path].tobytes() == b[path].tobytes(), path


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('uninterrupted')
  subprocess.run(cli(workdir, *SOAK), cwd=ROOT, check=True, capture_output=True)
  return workdir


def wait_for_step(proc, ckpt_dir, step, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    latest = checkpoint.latest_step(ckpt_dir)
    if latest is not None and latest >= step:
      return
    time.sleep(0.02)


def test_sigterm_checkpoints_the_current_step_and_resume_is_bit_identical(tmp_path, uninterrupted):
  proc = subprocess.Popen(
    cli(tmp_path, *SOAK), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
  )
  wait_for_step(proc, tmp_path / 'checkpoints', 30)
  # SIGUSR1 prints where the run is (every thread's stack) and the run goes on.
  proc.send_signal(signal.SIGUSR1)
  time.sleep(0.5)
  assert proc.poll() is None
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM
  assert '(most recent call first)' in stderr and 'in train_and_evaluate' in stderr
  line = [l for l in stderr.splitlines() if l.startswith('preempted at step')][-1]
  step = int(line.split()[3])
  assert line == (
    f'preempted at step {step} by SIGTERM; checkpoint written, run the same command to resume'
  )
  assert checkpoint.latest_step(tmp_path / 'checkpoints') == step < 200
  subprocess.run(cli(tmp_path, *SOAK), cwd=ROOT, check=True, capture_output=True)
  assert_same_params(uninterrupted, tmp_path)
  assert json.load(open(tmp_path / 'summary.json'))['steps'] == 200


def test_soak_three_random_kills_end_bit_identical(tmp_path, uninterrupted):
  rng = random.Random(0)
  targets = sorted(rng.sample(range(20, 190, 10), 3))
  for target, sig in zip(targets, [signal.SIGKILL, signal.SIGTERM, signal.SIGKILL]):
    proc = subprocess.Popen(
      cli(tmp_path, *SOAK), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for_step(proc, tmp_path / 'checkpoints', target)
    proc.send_signal(sig)
    proc.wait(timeout=120)
  subprocess.run(cli(tmp_path, *SOAK), cwd=ROOT, check=True, capture_output=True)
  assert_same_params(uninterrupted, tmp_path)
  steps = [r['step'] for r in read_jsonl(tmp_path / 'metrics.jsonl') if 'eval/accuracy' in r]
  assert steps[-1] == 200


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
  config = default.get_config('runlocal')
  loop.train_and_evaluate(config, str(tmp_path))
  for root, _, files in os.walk(tmp_path / 'checkpoints' / '20' / 'state'):
    for name in files:
      open(os.path.join(root, name), 'w').close()  # truncated, as by a dying disk
  config.num_train_steps = 30
  summary = loop.train_and_evaluate(config, str(tmp_path))
  assert summary['steps'] == 30
  warning = [r.getMessage() for r in caplog.records if 'damaged' in r.getMessage()]
  assert warning and warning[0].startswith('checkpoint step 20 is damaged')
  assert 'resuming from step 10 instead; moved to damaged-20' in warning[0]
  assert (tmp_path / 'checkpoints' / 'damaged-20').is_dir()
  assert checkpoint.all_steps(tmp_path / 'checkpoints') == [20, 30]  # 20 rewritten


def test_non_finite_loss_stops_naming_the_step_and_keeps_finite_checkpoints(tmp_path):
  config = default.get_config('runlocal')
  config.optimizer.learning_rate = 1e30
  config.optimizer.schedule = 'constant'
  config.checkpoint_every_steps = 1
  with pytest.raises(
    FloatingPointError,
    match=r'^non-finite train/\w+ \(\w+\) at step (\d+); '
    r'stopped, the last checkpoint is kept',
  ) as e:
    loop.train_and_evaluate(config, str(tmp_path))
  bad_step = int(str(e.value).split(' at step ')[1].split(';')[0])
  assert checkpoint.latest_step(tmp_path / 'checkpoints') == bad_step - 1
  state_params = params_of(tmp_path)
  assert all(np.all(np.isfinite(x)) for x in state_params.values())


def test_skip_nonfinite_mode_counts_skipped_steps(tmp_path):
  config = default.get_config('runlocal')
  config.optimizer.learning_rate = 1e30
  config.optimizer.schedule = 'constant'
  config.skip_nonfinite_updates = True
  summary = loop.train_and_evaluate(config, str(tmp_path))
  assert summary['steps'] == 20 and 0 < summary['skipped_steps'] < 20
  logged = [
    r['train/skipped_steps']
    for r in read_jsonl(tmp_path / 'metrics.jsonl')
    if 'train/skipped_steps' in r
  ]
  assert sum(logged) == summary['skipped_steps']


def test_frozen_integrity_in_summary_and_mismatch_is_an_error(tmp_path, monkeypatch):
  config = plain_vgg11(default.get_config('runlocal'))
  config.policy.name = 'linear_probe'
  config.num_train_steps = 4
  summary = loop.train_and_evaluate(config, str(tmp_path / 'ok'))
  assert summary['frozen_unchanged'] and summary['frozen_leaves'] == 16
  calls = []
  real = policies.frozen_checksums

  def flip_on_second_call(plan, params):
    sums = real(plan, params)
    calls.append(1)
    return dict(sums, **{'block2_conv1/kernel': 'x'}) if len(calls) == 2 else sums

  monkeypatch.setattr(loop.policies, 'frozen_checksums', flip_on_second_call)
  with pytest.raises(
    loop.FrozenParametersChanged,
    match=r'differ from their loaded values: '
    r'block2_conv1/kernel$',
  ):
    loop.train_and_evaluate(config, str(tmp_path / 'bad'))


@pytest.mark.parametrize(
  'override, message',
  [
    (
      ('policy.name', 'lienar_probe'),
      r"unknown policy 'lienar_probe' \(did you mean "
      r"'linear_probe'\?\)",
    ),
    (('policy.name', 'regex'), r'policy regex: every parameter must match exactly one rule'),
    (('batch_size', 30), r'global batch size 30 is not divisible by 8 devices'),
    (('dataset.image_size', 16), r'input size 16x16 is too small for VGG'),
    (('dataset.eval_split', 'validation'), r'validation'),
    (('dataset.classes', (3, 12)), r'12'),
    (('parallelism', 'pjit'), r"unknown parallelism 'pjit'"),
    (('model.name', 'vgg17'), r"unknown model 'vgg17'"),
    (('dataset.shards', 3), r'data shards 3: need a divisor of the global batch 32'),
  ],
)
def test_bad_input_is_one_line_before_anything_is_written(tmp_path, override, message):
  config = default.get_config('runlocal')
  key, value = override
  section, _, field = key.rpartition('.')
  (config[section] if section else config)[field] = value
  with pytest.raises(errors.InputError, match=message) as e:
    loop.train_and_evaluate(config, str(tmp_path / 'run'))
  assert '\n' not in str(e.value)
  assert not (tmp_path / 'run').exists()


def test_more_data_shards_than_examples_is_one_line(tmp_path):
  config = default.get_config('runlocal')
  config.dataset.examples_per_class, config.dataset.shards = 1, 16
  with pytest.raises(errors.InputError, match=r'dataset.shards=16 exceeds the 10 training'):
    loop.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_bad_override_on_the_command_line_exits_2_with_one_line(tmp_path):
  result = subprocess.run(
    cli(tmp_path / 'run', '--config.polcy.name=bitfit'),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
    "error: --config.polcy.name: the config has no field 'polcy'; did you mean --config.policy?"
  )
  assert not (tmp_path / 'run').exists()
