"""configs/studies/vtab1k.py: VTAB-1k's 19 tasks, checked offline (tfds' code and mock data)."""

import functools
import json
import os
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs.studies import vtab1k
from ftlab.data import labels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'scripts'))

import study  # noqa: E402


def test_the_nineteen_tasks_their_groups_and_splits():
  config = study.load_study('configs/studies/vtab1k.py')
  tasks = config['tasks']
  assert len(tasks) == 19 and set(tasks) == set(vtab1k.NUM_CLASSES)
  groups = [t['group'] for t in tasks.values()]
  assert [groups.count(g) for g in ('natural', 'specialized', 'structured')] == [7, 4, 8]
  for name, task in tasks.items():
    run = study.run_config(config, study.Job(name, 'full', 0, 1e-3), '/tmp/unused')
    assert run.dataset.train_split == 'train[:800]', name
    minival = run.dataset.minival
    # val200: 200 images of another split, or of the training split past train800.
    split, _, window = minival.partition('[')
    start, end = (int(x) if x else 0 for x in window.rstrip(']').split(':'))
    assert end - start == 200, (name, minival)
    assert split != 'train' or start >= 800, (name, minival)
  # The benchmark's cuts, from tfds' split sizes (task_adaptation's percentages).
  assert tasks['caltech101']['minival'] == 'train[2754:2954]'
  assert tasks['eurosat']['overrides'][2] == ['dataset.eval_split', 'train[21600:]']
  assert tasks['dsprites_location']['minival'] == 'train[589824:590024]'
  assert tasks['clevr_count']['overrides'][2] == ['dataset.eval_split', 'validation']


@pytest.mark.parametrize('task', list(vtab1k.TASKS))
def test_each_tasks_label_has_the_benchmarks_classes(task):
  """The label each task names, resolved on its tfds builder's real features (from tfds'
  code, nothing downloaded), has VTAB's number of classes."""
  name, _, _, spec, _ = vtab1k.TASKS[task]
  builder = tfds.builder(name)
  assert len(labels.resolve(spec, builder).names) == vtab1k.NUM_CLASSES[task]


def test_bad_task_subset_or_argument_is_one_line():
  with pytest.raises(study.StudyError, match=r"\['clevr'\] are not VTAB-1k tasks; valid: calte"):
    study.load_study('configs/studies/vtab1k.py:tasks=clevr')
  with pytest.raises(study.StudyError, match=r"unknown config argument 'dat'; valid: batch, da"):
    study.load_study('configs/studies/vtab1k.py:dat=/x')
  config = study.load_study('configs/studies/vtab1k.py:data_dir=/data/tfds')
  assert ['dataset.data_dir', '/data/tfds'] in config['overrides']


def fake_value(feature, rng, length=4):
  """A valid decoded value of a tfds feature (made-up content; sequences `length` long)."""
  f = tfds.features
  if isinstance(feature, f.FeaturesDict):
    return {k: fake_value(v, rng, length) for k, v in feature.items()}
  if isinstance(feature, f.Sequence):
    items = [fake_value(feature.feature, rng, length) for _ in range(length)]
    if isinstance(feature.feature, f.FeaturesDict):
      return {k: [item[k] for item in items] for k in feature.feature}
    return items
  if isinstance(feature, f.Image):
    shape = [s or 12 for s in feature.shape]
    return rng.integers(0, 256, shape, dtype=np.uint8)
  if isinstance(feature, f.ClassLabel):
    return int(rng.integers(feature.num_classes))
  if isinstance(feature, f.BBoxFeature):
    y, x = np.sort(rng.random(2)), np.sort(rng.random(2))
    return f.BBox(ymin=y[0], xmin=x[0], ymax=y[1], xmax=x[1])
  if isinstance(feature, f.Text):
    return 'made up'
  shape = [s or length for s in feature.shape]
  if np.issubdtype(feature.np_dtype, np.integer):
    return rng.integers(0, 10, shape).astype(feature.np_dtype)
  # Depths (CLEVR's pixel_coords, KITTI's location) spread over the benchmark's bins.
  return (rng.random(shape) * 40).astype(feature.np_dtype)


@pytest.fixture
def mock_vtab():
  """tfds' mock data with made-up examples that are valid for the features: tfds' own random
  examples break on CLEVR and KITTI (a sequence's fields drawn at different lengths, bounding
  boxes with min > max, texts in sequences)."""

  def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
    features = self.info.features
    rng = np.random.default_rng(len(split))
    records = [features.serialize_example(fake_value(features, rng)) for _ in range(24)]
    decode = functools.partial(features.deserialize_example, decoders=decoders)
    return tf.data.Dataset.from_tensor_slices(records).map(decode)

  policy = tfds.testing.MockPolicy.USE_CODE
  with tfds.testing.mock_data(policy=policy, as_dataset_fn=as_dataset):
    yield


STUDY = """
from configs.studies import vtab1k

def get_config(arg=None):
  study = vtab1k.get_config('tasks={tasks},seeds=1,steps=2,image_size=32,batch=8')
  study.overrides = study.overrides + (
    ('init.checkpoint', 'scratch'), ('model.name', 'vgg11'), ('model.width', 1 / 16),
    ('eval_batch_size', 8), ('checkpoint_every_steps', 2), ('log_every_steps', 1),
    ('record_step_flops', False), ('dataset.eval_splits', 'head=test[:4]'),
  )
  study.plans = {{'full': study.plans['full']}}
  study.learning_rates = (0.01,)
  return study
"""


@pytest.mark.slow
def test_a_vtab_study_runs_on_mock_data(tmp_path, mock_vtab):
  """Four structured tasks (computed, binned and keyed labels) through the driver on tfds'
  mock data: every run trains a head of the task's class count and the report covers all.
  """
  tasks = ('clevr_distance', 'kitti_distance', 'dsprites_orientation', 'smallnorb_elevation')
  spec = tmp_path / 'vtab_tiny.py'
  spec.write_text(STUDY.format(tasks='/'.join(tasks)))
  root = str(tmp_path / 'study')
  report = study.run_study(str(spec), root)
  assert [r['task'] for r in report['runs'] if r['role'] == 'test'] == list(tasks)
  assert {c['task'] for c in report['cells']} == set(tasks)
  assert {c['metric'] for c in report['cells']} == {'test', 'head'}  # the named eval split
  assert all(set(r['accuracy']) == {'test', 'minival', 'head'} for r in report['runs'])
  for task in tasks:
    with open(os.path.join(study.Job(task, 'full', 0, 0.01).directory(root), 'data.json')) as f:
      data = json.load(f)
    assert len(data['train']['classes']) == vtab1k.NUM_CLASSES[task]
    assert data['train']['label'] == vtab1k.TASKS[task][3]
    assert set(data) == {'train', 'eval', 'minival', 'head'}
