"""`dataset.label` (ftlab/data/labels.py): VTAB's computed labels against a numpy reference,
the generic forms, their errors, and the label reaching the batches."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from ftlab.data import datasets, input_pipeline, labels


def reference_bin(value, edges):
  """task_adaptation's `reduce_max(where(thrs - dist < 0))`, in numpy."""
  return int(np.max(np.where(np.asarray(edges, np.float32) - np.float32(value) < 0)[0]))


@pytest.fixture(scope='module')
def builders():
  # The builders' features come from tfds' code: nothing is downloaded or prepared.
  return {name: tfds.builder(name) for name in ('clevr', 'kitti', 'dsprites', 'smallnorb')}


@pytest.mark.parametrize(
  'depths',
  [[8.0], [8.0001], [12.0, 8.3, 9.7], [9.5, 11.0], [10.0], [10.5, 30.0], [0.5], [99.0, 9.25]],
)
def test_clevr_distance_is_the_closest_depth_binned_as_vtab(builders, depths):
  label = labels.resolve('clevr_distance', builders['clevr'])
  coords = np.zeros([len(depths), 3], np.float32)
  coords[:, 2] = depths
  got = int(label.of({'objects': {'pixel_coords': tf.constant(coords)}}))
  assert got == reference_bin(min(depths), labels.CLEVR_DISTANCE_EDGES)
  assert label.names[got] == label.names[reference_bin(min(depths), (0, 8, 8.5, 9, 9.5, 10, 100))]
  assert len(label.names) == 6


def test_clevr_count_is_objects_less_three(builders):
  label = labels.resolve('clevr_count', builders['clevr'])
  for count in range(3, 11):
    got = label.of({'objects': {'size': tf.zeros([count], tf.int64)}})
    assert int(got) == count - 3 and label.names[int(got)] == str(count)
  assert len(label.names) == 8


@pytest.mark.parametrize(
  'types, depths, expected',
  [
    (['Car'], [5.0], 0),
    (['Pedestrian', 'Van'], [3.0, 15.0], 1),  # a pedestrian is closer, but no vehicle
    (['Truck', 'Car'], [40.0, 25.0], 2),
    (['Cyclist', 'Tram', 'Misc'], [2.0, 4.0, 6.0], 3),  # no car, van or truck
    ([], [], 3),  # no object at all
    (['Car'], [8.0], 0),
    (['Car'], [20.0], 1),
    (['Car', 'Van'], [998.0, 1200.0], 2),
  ],
)
def test_kitti_distance_is_the_closest_vehicle_binned_as_vtab(builders, types, depths, expected):
  names = builders['kitti'].info.features['objects']['type'].names
  label = labels.resolve('kitti_distance', builders['kitti'])
  location = np.zeros([len(depths), 3], np.float32)
  location[:, 2] = depths
  objects = {
    'type': tf.constant([names.index(t) for t in types], tf.int64),
    'location': tf.constant(location),
  }
  got = int(label.of({'objects': objects}))
  # The reference: task_adaptation keeps types < 3 (Car, Van, Truck) and appends 1000 m.
  vehicles = [d for t, d in zip(types, depths) if names.index(t) < 3] + [1000.0]
  assert got == reference_bin(min(vehicles), labels.KITTI_DISTANCE_EDGES) == expected
  assert label.names[3] == 'no vehicle'


@pytest.mark.parametrize('feature, n', [('label_orientation', 16), ('label_x_position', 16)])
def test_bins_equal_vtabs_float_division(builders, feature, n):
  k = builders['dsprites'].info.features[feature].num_classes
  label = labels.resolve(f'bins:{feature}:{n}', builders['dsprites'])
  values = np.arange(k)
  got = [int(label.of({feature: tf.constant(v, tf.int64)})) for v in values]
  # task_adaptation: floordiv(float(v), k / n), in float32.
  expected = np.floor_divide(values.astype(np.float32), np.float32(k / n)).astype(int)
  np.testing.assert_array_equal(got, expected)
  assert len(label.names) == n and np.bincount(got).min() >= 2
  assert label.names[0] == f'{feature} 0-{k // n - 1 if k % n == 0 else 2}'


def test_key_and_default_labels(builders):
  norb = builders['smallnorb']
  assert len(labels.resolve('key:label_elevation', norb).names) == 9
  assert len(labels.resolve('', norb).names) == 5  # its supervised key: label_category
  assert int(labels.resolve('key:label_azimuth', norb).of({'label_azimuth': tf.constant(7)})) == 7


@pytest.mark.parametrize(
  'name, spec, message',
  [
    ('clevr', '', r'^clevr has no class label of its own; choose one with dataset.label'),
    ('clevr', 'clevr_size', r"^dataset.label='clevr_size' is not a label; valid: '', 'key:F"),
    ('smallnorb', 'key:azimuth', r"reads 'azimuth', which smallnorb lacks \(features: image,"),
    ('dsprites', 'key:value_scale', r"^dataset.label: dsprites feature 'value_scale' is no cla"),
    ('dsprites', 'bins:label_orientation:41', r'41 bins of label_orientation, valid: 1 to 40'),
    (
      'dsprites',
      'bins:label_orientation:x',
      r"'x' is not a whole number of bins \(valid: 1 to 40\)",
    ),
    ('smallnorb', 'kitti_distance', r"reads 'objects', which smallnorb lacks"),
  ],
)
def test_bad_label_is_one_line(builders, name, spec, message):
  with pytest.raises(labels.LabelError, match=message) as e:
    labels.resolve(spec, builders[name])
  assert '\n' not in str(e.value)


def test_image_folders_have_only_their_own_labels(tmp_path):
  from PIL import Image

  for split in ('train',):
    for c in ('a', 'b'):
      (tmp_path / split / c).mkdir(parents=True)
      Image.new('RGB', (4, 4)).save(tmp_path / split / c / 'x.png')
  with pytest.raises(labels.LabelError, match=r"has only its folder names as labels; valid: ''"):
    datasets.build_dataset(f'image_folder:{tmp_path}', 'train', label='key:label')


def test_the_label_reaches_the_split_and_the_batches():
  """dSprites' orientation in 16 bins, on tfds' mock data: the split's labels and every eval
  batch's labels are `v * 16 // 40` of the records' own `label_orientation`."""
  policy = tfds.testing.MockPolicy.USE_CODE
  with tfds.testing.mock_data(num_examples=37, policy=policy):
    spec = 'bins:label_orientation:16'
    split = datasets.build_dataset('dsprites', 'train', download=True, label=spec)
    raw = tfds.builder('dsprites').as_dataset(split='train')
    orientation = np.array([int(ex['label_orientation']) for ex in raw])
    assert split.num_classes == 16 and split.describe()['label'] == spec
    np.testing.assert_array_equal(split.labels, orientation * 16 // 40)
    order = input_pipeline.BatchOrder(8)
    batches = input_pipeline.eval_iterator(split, order, image_size=16, preprocess='unit')
    got = np.concatenate([b['label'][b['mask'] > 0] for b in batches])
    np.testing.assert_array_equal(got, orientation * 16 // 40)
