"""Remote workdirs: runs, resumes and `combine` into `gs://`, on a GCS emulator on loopback,
with nothing written locally; appends; unknown schemes."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import tensorflow as tf

from configs import default
from ftlab import errors, run
from ftlab.data import sources
from ftlab.files import storage, workdir
from ftlab.files.metric_writers import MetricWriter, read_jsonl
from tests import gcs_emulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = 'bucket'
needs_emulator = pytest.mark.skipif(
  not all(importlib.util.find_spec(m) for m in ('gcp_storage_emulator', 'gcsfs')),
  reason='gcp-storage-emulator or gcsfs absent: pip install -e ".[test]"',
)
needs_fashion_mnist = pytest.mark.skipif(
  not os.path.isdir(sources.DEBIAN_FASHION_MNIST_DIR),
  reason='Fashion-MNIST IDX files absent: apt-get install dataset-fashion-mnist',
)


# --- Fast: the path layer on local paths. ------------------------------------------------------


def test_appender_appends_locally_and_a_new_one_continues(tmp_path):
  path = tmp_path / 'sub' / 'log.jsonl'
  appender = storage.Appender(path)
  appender.write('a\n')
  assert path.read_text() == 'a\n'  # flushed at each write: a killed run keeps its lines
  appender.write('b\n')
  appender.close()
  storage.append_text(path, 'c\n')
  assert path.read_text() == 'a\nb\nc\n'
  binary = storage.Appender(tmp_path / 'events', binary=True)
  binary.write(b'\x00\x01')
  binary.write(b'\x02')
  binary.close()
  assert (tmp_path / 'events').read_bytes() == b'\x00\x01\x02'


def test_unknown_scheme_is_one_line_naming_the_valid_ones(tmp_path):
  with pytest.raises(storage.UnsupportedPath) as e:
    workdir.Workdir('foo://x/run')
  assert str(e.value) == (
    "workdir 'foo://x/run': unsupported scheme foo://; use a local path, or gs://, s3://"
  )
  config = default.get_config('runlocal')
  with pytest.raises(errors.InputError, match=r"^workdir 'ram://x/run': unsupported scheme ram://"):
    run.make_run(config, 'ram://x/run')  # before any data is read or anything compiled
  config.activation_cache, config.activation_cache_dir = 'disk', 'memory://b/cache'
  with pytest.raises(errors.InputError, match=r"^activation_cache_dir 'memory://b/cache': unsup"):
    run.make_run(config, str(tmp_path))
  assert not os.listdir(tmp_path)
  storage.check('gs://b/run')
  storage.check('relative/dir')


def test_tensorboard_events_reach_the_workdir_at_each_write(tmp_path):
  writer = MetricWriter(str(tmp_path / 'metrics.jsonl'), str(tmp_path / 'tb'))
  writer.write(1, {'loss': 2.0})
  [events] = os.listdir(tmp_path / 'tb')  # before close: copied at the flush
  writer.write(2, {'loss': float('nan')})
  writer.close()
  writer = MetricWriter(str(tmp_path / 'metrics.jsonl'), str(tmp_path / 'tb'))  # a resume
  writer.write(3, {'loss': 1.0})
  writer.close()
  assert len(os.listdir(tmp_path / 'tb')) == 2  # a new event file per writer
  scalars = [
    (e.step, v.tag, float(tf.make_ndarray(v.tensor)))
    for e in tf.compat.v1.train.summary_iterator(str(tmp_path / 'tb' / events))
    for v in e.summary.value
  ]
  assert scalars[0] == (1, 'loss', 2.0) and scalars[1][:2] == (2, 'loss')
  assert [r['step'] for r in read_jsonl(tmp_path / 'metrics.jsonl')] == [1, 2, 3]


# --- Slow: end to end on the emulator. ---------------------------------------------------------


@pytest.fixture(scope='module')
def emulator(tmp_path_factory):
  """The emulator's URL. The runs reach it through ftlab's path layer; the test reads and
  writes the bucket through the emulator's JSON API, another client."""
  proc, url = gcs_emulator.start(BUCKET, cwd=str(tmp_path_factory.mktemp('emulator')))
  try:
    yield url
  finally:
    proc.terminate()
    proc.wait(timeout=30)


def fresh_dirs(tmp_path):
  dirs = {name: tmp_path / name for name in ('cwd', 'home', 'tmp')}
  for d in dirs.values():
    d.mkdir()
  return dirs


def launch(url, dirs, *args, script=('-m', 'ftlab.main'), timeout=600):
  """A subprocess in empty cwd, HOME and TMPDIR, reaching the emulator; the prepared tfds data
  (read only) and JAX's compilation cache stay where the suite keeps them."""
  env = dict(
    os.environ,
    **gcs_emulator.environment(url),
    HOME=str(dirs['home']),
    TMPDIR=str(dirs['tmp']),
    PYTHONPATH=ROOT,
    TFDS_DATA_DIR=os.path.expanduser('~/tensorflow_datasets'),
  )
  return subprocess.run(
    [sys.executable, *script, *args],
    cwd=dirs['cwd'],
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def written_locally(dirs):
  """Files the subprocesses left in cwd and TMPDIR, and in HOME beyond what importing
  TensorFlow writes there (Keras' config, matplotlib's font cache)."""
  found = []
  for name, d in dirs.items():
    for root, subdirs, files in os.walk(d):
      rel = os.path.relpath(root, d)
      found += [f'{name}/{rel}/{s}' for s in subdirs if s.startswith('gs:')]
      for f in files:
        path = os.path.normpath(f'{rel}/{f}')
        if name == 'home' and path.startswith(('.keras/', '.cache/matplotlib/')):
          continue
        found.append(f'{name}/{path}')
  return found


@pytest.mark.slow
@needs_emulator
@needs_fashion_mnist
def test_run_resume_fallback_combine_and_sweep_in_a_gs_workdir(emulator, tmp_path):
  dirs = fresh_dirs(tmp_path)
  config = f'--config={ROOT}/configs/default.py:runlocal'
  work = f'gs://{BUCKET}/run'

  first = launch(emulator, dirs, config, f'--workdir={work}')
  assert first.returncode == 0, first.stderr[-3000:]
  names = gcs_emulator.objects(emulator, BUCKET, 'run/')
  for name in ('config.json', 'plan.txt', 'data.json', 'launches.jsonl', 'summary.json'):
    assert f'run/{name}' in names, name
  assert [n for n in names if n.startswith('run/tensorboard/events.out.tfevents.')]
  for step in (10, 20):
    assert f'run/checkpoints/{step}/commit_success.txt' in names

  def read(name):
    return gcs_emulator.read(emulator, BUCKET, f'run/{name}').decode()

  def metrics():
    return [json.loads(line) for line in read('metrics.jsonl').splitlines()]

  assert [r['step'] for r in metrics() if 'eval/accuracy' in r] == [10, 20]
  summary = json.loads(read('summary.json'))
  assert summary['steps'] == 20 and summary['final_eval_accuracy'] >= 0.3

  # A resume (a longer run) continues from the bucket's checkpoint and its records.
  resumed = launch(emulator, dirs, config, f'--workdir={work}', '--config.num_train_steps=30')
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  records = metrics()
  assert [r['step'] for r in records if 'train/loss' in r] == [5, 10, 15, 20, 25, 30]
  assert [r['step'] for r in records if 'eval/accuracy' in r] == [10, 20, 30]
  launches = [json.loads(line) for line in read('launches.jsonl').splitlines()]
  assert [r['first_step'] for r in launches] == [0, 20]
  events = gcs_emulator.objects(emulator, BUCKET, 'run/tensorboard/')
  assert len(events) == 2  # one event file per launch
  assert json.loads(read('summary.json'))['steps'] == 30

  # A damaged newest checkpoint: moved aside in the bucket, the previous one resumed.
  for obj in gcs_emulator.objects(emulator, BUCKET, 'run/checkpoints/30/state/'):
    gcs_emulator.write(emulator, BUCKET, obj, b'x')  # cut short, as by a failing upload
  # And a step whose save was cut short (no commit marker): ignored, then replaced.
  gcs_emulator.write(emulator, BUCKET, 'run/checkpoints/40/state/_METADATA', b'x')
  fallback = launch(emulator, dirs, config, f'--workdir={work}', '--config.num_train_steps=40')
  assert fallback.returncode == 0, fallback.stderr[-3000:]
  assert 'checkpoint step 30 is damaged' in fallback.stderr
  assert 'resuming from step 20 instead; moved to damaged-30' in fallback.stderr
  names = gcs_emulator.objects(emulator, BUCKET, 'run/checkpoints/')
  assert 'run/checkpoints/damaged-30/commit_success.txt' in names
  steps = {n.split('/')[2] for n in names if n.endswith('/commit_success.txt')}
  assert steps == {'damaged-30', '30', '40'}  # 30 rewritten by the resumed run; 20 dropped
  assert json.loads(read('summary.json'))['steps'] == 40

  # combine over gs:// runs (a run and its copy), into gs://.
  result = launch(
    emulator,
    dirs,
    config,
    f'--checkpoints={work},{work}/checkpoints',
    '--method=logits',
    f'--workdir=gs://{BUCKET}/combined',
    script=(f'{ROOT}/scripts/combine.py',),
  )
  assert result.returncode == 0, result.stderr[-3000:]
  output = json.loads(gcs_emulator.read(emulator, BUCKET, 'combined/combine.json'))
  rows = {r['name']: r for r in output['results']}
  assert rows['logit ensemble']['eval'] == rows['run']['eval']  # an ensemble of copies
  table = gcs_emulator.read(emulator, BUCKET, 'combined/combine.md').decode()
  assert table.strip() in result.stdout

  # A sweep of one run into gs://: its grid, the run, its log and the report in the bucket.
  sweep = launch(
    emulator,
    dirs,
    f'--workdir=gs://{BUCKET}/sweep',
    f'--config={ROOT}/configs/default.py:runlocal',
    '--plans=linear_probe',
    '--seeds=1',
    '--',
    '--config.num_train_steps=2',
    script=(f'{ROOT}/scripts/sweep.py',),
  )
  assert sweep.returncode == 0, sweep.stdout[-2000:] + sweep.stderr[-2000:]
  names = set(gcs_emulator.objects(emulator, BUCKET, 'sweep/'))
  [run] = {n.rsplit('/', 1)[0] for n in names if n.endswith('/seed1/summary.json')}
  assert run.startswith('sweep/runs/default/linear_probe/lr')
  run_files = {f'{run}/{f}' for f in ('summary.json', 'process.json', 'log.txt')}
  report = ('sweep.json', 'sweep_study.json', 'study.json', 'results.csv', 'report.md')
  assert run_files | {f'sweep/{f}' for f in report + ('heatmap.png',)} <= names
  log = gcs_emulator.read(emulator, BUCKET, f'{run}/log.txt').decode()
  assert 'training steps 1..2 under linear_probe' in log
  assert '| `linear_probe` |' in gcs_emulator.read(emulator, BUCKET, 'sweep/report.md').decode()

  # The disk activation cache in the gs:// workdir: uploaded whole, reused by the resume.
  cached = [config, f'--workdir=gs://{BUCKET}/cached', '--config.activation_cache=disk']
  cached += ['--config.policy.name=last_blocks(1)', '--config.dataset.augment=none']
  first = launch(emulator, dirs, *cached, '--config.num_train_steps=10')
  assert first.returncode == 0, first.stderr[-3000:]
  files = gcs_emulator.objects(emulator, BUCKET, 'cached/activation_cache/')
  assert sorted({f.rsplit('.', 1)[-1] for f in files}) == ['bin', 'json', 'npy'] and len(files) == 6
  again = launch(emulator, dirs, *cached, '--config.num_train_steps=20')
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stderr.count('activation cache: reusing gs://') == 2  # train and eval
  summary = json.loads(gcs_emulator.read(emulator, BUCKET, 'cached/summary.json'))
  assert summary['steps'] == 20 and summary['activation_cache'] == {'last_blocks(k=1)': 'block5'}
  assert written_locally(dirs) == []


@pytest.mark.slow  # a subprocess
def test_unknown_scheme_stops_with_one_line_and_writes_nothing(tmp_path):
  dirs = fresh_dirs(tmp_path)
  result = launch(
    'http://127.0.0.1:9', dirs, f'--config={ROOT}/configs/default.py:runlocal', '--workdir=ram://x'
  )
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
    "error: workdir 'ram://x': unsupported scheme ram:// (TensorFlow's in-process memory "
    'filesystem: nothing in it outlives the run, and Orbax cannot write checkpoints there); '
    'use a local path, or gs://, s3://'
  )
  assert written_locally(dirs) == []
