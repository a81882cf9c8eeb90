"""Several processes through jax.distributed on this machine behave as one process."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ftlab.data import sources
from ftlab.files import checkpoint
from ftlab.files.metric_writers import read_jsonl
from tests.run_files import params_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [
  pytest.mark.slow,
  pytest.mark.skipif(
    not os.path.isdir(sources.DEBIAN_FASHION_MNIST_DIR),
    reason='Fashion-MNIST IDX files absent: apt-get install dataset-fashion-mnist',
  ),
]
# A plain VGG11 under SGD, as the tolerances below were set for. Under runlocal's VGG11-BN and
# Adam, a conv bias before BatchNorm gets a gradient of pure rounding noise, which Adam scales
# up to +-lr per step (the bias, which the function ignores, then differs between reduction
# orders), and BatchNorm's sums in another order move the kernels by ~7e-5 relative in 20 steps.
RUN = [
  '--config.dataset.eval_split=test[:1001]',
  '--config.eval_batch_size=64',
  '--config.model.name=vgg11',
  '--config.model.head=mlp',
  '--config.dataset.augment=pad_crop',
  '--config.optimizer.name=sgd',
  '--config.optimizer.learning_rate=0.01',
  '--config.optimizer.schedule=cosine',
]


def launch(workdir, processes, devices, *overrides, wait=True):
  command = [
    sys.executable,
    'scripts/launch_local.py',
    f'--num_processes={processes}',
    f'--devices_per_process={devices}',
    # A stuck launch ends with each process's Python stacks (`failure`); a slow one (the CI
    # machine running other subprocess tests beside these) has room.
    '--timeout=600',
    '--',
    sys.executable,
    '-m',
    'ftlab.main',
    '--config=configs/default.py:runlocal',
    f'--workdir={workdir}',
    *RUN,
    *overrides,
  ]
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  if not wait:
    return subprocess.Popen(
      command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
  assert result.returncode == 0, failure(result.stdout + result.stderr)
  return result


def failure(output: str) -> str:
  """What a failed launch printed last, and first every process's stack in ftlab's code (a
  timed-out launch's SIGUSR1 dump), which the tail alone loses: where each process waited."""
  frames = [
    line
    for line in output.splitlines()
    if re.match(r'\[p\d+\]\s+(File ".*/(ftlab|scripts)/|Thread 0x|Current thread)', line)
  ]
  return '\n'.join(frames[-80:]) + '\n...\n' + output[-2500:]


def assert_same_run(a, b):
  pa, pb = params_of(a), params_of(b)
  for path in pa:
    np.testing.assert_allclose(pa[path], pb[path], rtol=1e-5, atol=1e-7, err_msg=path)
  sa, sb = (json.load(open(os.path.join(w, 'summary.json'))) for w in (a, b))
  assert sa['eval_examples'] == sb['eval_examples'] == 1001
  np.testing.assert_allclose(sa['final_eval_loss'], sb['final_eval_loss'], rtol=1e-5)
  assert sa['final_eval_accuracy'] == sb['final_eval_accuracy']


@pytest.fixture(scope='module')
def one_by_eight(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('one_by_eight')
  launch(workdir, 1, 8)
  return workdir


def started_pids(proc, until, output):
  """Reads the launcher's output into `output` until `until()`; the processes' pids."""
  pids = {}
  for line in proc.stdout:
    output.append(line)
    started = re.match(r'launch_local: started process (\d) \(pid (\d+)\)', line)
    if started:
      pids[int(started[1])] = int(started[2])
    if until():
      return pids
  raise AssertionError('the launch ended first:\n' + ''.join(output[-60:]))


@pytest.mark.parametrize('parallelism', ['pmap', 'shard_map'])
def test_two_processes_equal_one(tmp_path, one_by_eight, parallelism):
  result = launch(tmp_path, 2, 4, f'--config.parallelism={parallelism}')
  assert_same_run(tmp_path, one_by_eight)
  # Each process connects its Gloo groups at start (`parallel._connect_devices`), none at a
  # step, where a busy machine can put one process past gloo's fixed 30 s.
  for p in range(2):
    lines = [line for line in result.stdout.splitlines() if line.startswith(f'[p{p}]')]
    connected = [i for i, line in enumerate(lines) if '[Gloo]' in line]
    steps = next(i for i, line in enumerate(lines) if 'training steps 1..20' in line)
    assert connected and max(connected) < steps, '\n'.join(lines)
  # Only process 0 writes: every logged step appears once.
  steps = [r['step'] for r in read_jsonl(tmp_path / 'metrics.jsonl') if 'train/loss' in r]
  assert steps == [5, 10, 15, 20]
  assert checkpoint.all_steps(tmp_path / 'checkpoints') == [10, 20]
  if parallelism == 'pmap':
    # The 2 x 4 checkpoint restores in a 1 x 8 run: resumed at the end, it evaluates the
    # restored state.
    summary = json.load(open(tmp_path / 'summary.json'))
    os.remove(tmp_path / 'summary.json')
    launch(tmp_path, 1, 8)
    again = json.load(open(tmp_path / 'summary.json'))
    assert again['steps'] == 20 and again['eval_examples'] == 1001
    assert again['final_eval_accuracy'] == summary['final_eval_accuracy']
    # Sums over other batch compositions: equal up to float rounding.
    np.testing.assert_allclose(again['final_eval_loss'], summary['final_eval_loss'], rtol=1e-5)


def test_lost_peer_ends_the_job_and_relaunch_resumes(tmp_path, one_by_eight):
  proc = launch(tmp_path, 2, 4, '--config.checkpoint_every_steps=5', wait=False)
  output = []
  pids = started_pids(proc, lambda: checkpoint.latest_step(tmp_path / 'checkpoints'), output)
  killed_at = time.time()
  os.kill(pids[1], signal.SIGKILL)
  rest, _ = proc.communicate(timeout=120)
  assert time.time() - killed_at < 60  # the other process did not hang on the lost peer
  assert proc.returncode != 0
  assert 'launch_local: process 1 ended with signal SIGKILL; stopping the others' in rest
  assert checkpoint.latest_step(tmp_path / 'checkpoints') < 20
  # The same command resumes from the last checkpoint and ends as if never stopped.
  launch(tmp_path, 2, 4, '--config.checkpoint_every_steps=5')
  assert_same_run(tmp_path, one_by_eight)


def test_sigterm_to_one_process_stops_the_job_at_one_step(tmp_path, tmp_path_factory):
  """Only process 1 is signalled; both stop after the same step (agreed through JAX's
  coordination service), one checkpoint of that step is written, and the relaunch ends
  bit-identical to an uninterrupted 2 x 4 run."""
  longer = ['--config.num_train_steps=40', '--config.checkpoint_every_steps=40']
  reference = tmp_path_factory.mktemp('two_by_four')
  launch(reference, 2, 4, *longer)
  proc = launch(tmp_path, 2, 4, *longer, wait=False)
  output = []
  # Process 0 logs step 5's metrics once the loop runs (and the handlers are installed).
  pids = started_pids(proc, lambda: re.search(r'\[p0\].*step 5/40', output[-1]), output)
  os.kill(pids[1], signal.SIGTERM)
  rest, _ = proc.communicate(timeout=120)
  text = ''.join(output) + rest
  stopped = {int(p): int(s) for p, s in re.findall(r'\[p(\d)\].*preempted at step (\d+)', text)}
  assert sorted(stopped) == [0, 1], text[-3000:]
  assert stopped[0] == stopped[1] < 40
  assert proc.returncode == 128 + signal.SIGTERM
  assert checkpoint.all_steps(tmp_path / 'checkpoints') == [stopped[0]]
  assert not os.path.exists(tmp_path / 'summary.json')
  launch(tmp_path, 2, 4, *longer)
  pa, pb = params_of(tmp_path), params_of(reference)
  for path in pa:
    np.testing.assert_array_equal(pa[path], pb[path], err_msg=path)
  sa, sb = (json.load(open(os.path.join(w, 'summary.json'))) for w in (tmp_path, reference))
  assert sa['final_eval_loss'] == sb['final_eval_loss']
  assert sa['final_eval_accuracy'] == sb['final_eval_accuracy']


def test_data_shards_two_processes_read_half_and_equal_one(tmp_path_factory):
  """With 2 data shards each of 2 processes reads half of the training records, and the
  activation cache runs across them, each process holding its share: the run equals 1 x 8."""
  cached = [
    '--config.dataset.shards=2',
    '--config.dataset.augment=none',
    '--config.policy.name=last_blocks(2)',
    '--config.activation_cache=disk',
  ]
  runs = {}
  for processes, devices in [(1, 8), (2, 4)]:
    runs[processes] = tmp_path_factory.mktemp(f'shards_{processes}x{devices}')
    result = launch(runs[processes], processes, devices, *cached)
    reads = re.findall(
      r'process (\d) of (\d) reads training shards \[([\d, ]*)\] of 2: (\d+) of (\d+)',
      result.stdout,
    )
    expected = (
      [('0', '1', '0, 1', '1200', '1200')]
      if processes == 1
      else [('0', '2', '0', '600', '1200'), ('1', '2', '1', '600', '1200')]
    )
    assert sorted(reads) == expected, result.stdout[-3000:]
  assert_same_run(runs[2], runs[1])
  # Each process's cache holds its share: its training shard and its part of the eval split.
  sizes = {}
  for f in (runs[2] / 'activation_cache').glob('*.labels.npy'):
    split, process = f.name.split('-')[0], f.name.split('-')[-1].split('.')[0]
    sizes[split, process] = len(np.load(f))
  assert sizes == {
    ('train', 'p0'): 600,
    ('train', 'p1'): 600,
    ('eval', 'p0'): 501,
    ('eval', 'p1'): 500,
  }
  summary = json.load(open(runs[2] / 'summary.json'))
  assert summary['activation_cache'] == {'last_blocks(k=2)': 'block4'}
