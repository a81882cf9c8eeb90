"""tensorflow-datasets + tf.data -> host-local numpy batches.

Datasets are named by a string: a tfds catalog name (never downloaded unless `download=True`),
`fashion_mnist` (built offline from local IDX files by `LocalFashionMnist`) or
`image_folder:ROOT` (`ROOT/<split>/<class>/*.jpg|png|...`, read by `ImageFolder`, which is
`tfds.ImageFolder` without its blind spots: OS and tool clutter is ignored rather than read as
images or classes, and photos are turned upright by their EXIF orientation).

`build_dataset` resolves a split (slicing, class subset, per-class budget) to a `DataSplit`: the
positions of the chosen examples in the split's fixed order. Every process computes the same
`DataSplit` and reads its disjoint share `indices[process_index::process_count]`; records are
filtered and shuffled still encoded, and decoded only when a batch uses them.

`train_iterator`'s batches are a function of the seed and the step alone, so a run resumed at
step k sees what an uninterrupted run would; `train_indices` names their examples without
reading them (for caches of per-example values). `eval_iterator` yields every example once, padded
with a `'mask'`, in the same number of batches on every process.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gzip
import math
import os
import random
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow.python.eager import context as tf_context

from ftlab import preprocessing

DEBIAN_FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
IMAGE_FOLDER_PREFIX = 'image_folder:'
PREPROCESSING = preprocessing.CONVENTIONS
AUGMENTATIONS = ('none', 'flip', 'pad_crop', 'resized_crop')  # both crops also flip
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


class DatasetError(ValueError):
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
      orientations[(orientations < 1) | (orientations > 8)] = 1
      self._orientations[split] = orientations
    orientations = self._orientations[split]
    return orientations if (orientations != 1).any() else None


_FolderExample = collections.namedtuple('_FolderExample', ['image_path', 'label'])


def exif_transpose(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
  """An image `[h, w, c]` as a viewer shows it, given its EXIF orientation (1-8).

  The eight values are the four rotations with and without a mirror image; the pixels are
  moved as `PIL.ImageOps.exif_transpose` moves them.
  """
  rotate = lambda k: lambda: tf.image.rot90(image, k)
  transpose = lambda: tf.transpose(image, [1, 0, 2])
  branches = [
    lambda: image,  # 1: upright
    lambda: tf.image.flip_left_right(image),  # 2: mirrored
    rotate(2),  # 3: upside down
    lambda: tf.image.flip_up_down(image),  # 4: mirrored upside down
    transpose,  # 5: mirrored, rotated 90 degrees
    rotate(3),  # 6: rotated 90 degrees counter-clockwise (turn clockwise to show)
    lambda: tf.image.rot90(transpose(), 2),  # 7: mirrored, rotated 270 degrees
    rotate(1),  # 8: rotated 90 degrees clockwise (turn counter-clockwise to show)
  ]
  return tf.switch_case(tf.clip_by_value(orientation - 1, 0, 7), branches)


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
      raise ValueError(f'{self._idx_dir}: {len(images)} {prefix} images but {len(labels)} labels')
    for index, (image, label) in enumerate(zip(images, labels)):
      yield index, {'image': image[..., None], 'label': int(label)}


def read_idx(path: str, kind: str) -> np.ndarray:
  """Reads a uint8 IDX file, gzip'd or not: `[n, rows, cols]` images or `[n]` labels.

  Raises:
    ValueError: the file is not an IDX file of that kind, or is truncated.
  """
  with open(path, 'rb') as f:
    data = f.read()
  if data[:2] == b'\x1f\x8b':
    data = gzip.decompress(data)
  magic = int.from_bytes(data[:4], 'big')
  if magic != _IDX_MAGIC[kind]:
    raise ValueError(f'{path}: IDX magic {magic}, expected {_IDX_MAGIC[kind]} for {kind}')
  ndim = magic & 0xFF
  shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], 'big') for i in range(ndim))
  body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if body.size != math.prod(shape):
    raise ValueError(f'{path}: {body.size} bytes of data for an IDX array of shape {shape}')
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
    name: a tfds catalog name, `fashion_mnist` or `image_folder:ROOT`.
    data_dir: where tfds keeps prepared datasets (None: tfds' default, ~/tensorflow_datasets).
    download: let tfds download and prepare a catalog dataset (and use the catalog's
      `fashion_mnist` instead of the local files).
    fashion_mnist_dir: the Fashion-MNIST IDX files (None: the Debian package's directory).

  Raises:
    DatasetError: unknown name, or a dataset that is neither prepared nor preparable offline.
  """
  if name.startswith(IMAGE_FOLDER_PREFIX):
    return ImageFolder(name[len(IMAGE_FOLDER_PREFIX) :])
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


@dataclasses.dataclass(frozen=True, eq=False)
class DataSplit:
  """A split after slicing, class subset and per-class budget.

  Attributes:
    builder: the prepared tfds builder.
    read_split: the split string given to `builder.as_dataset`.
    indices: positions of the chosen examples in `read_split`'s fixed order, ascending.
    label_map: old label -> new label (-1: dropped), or None to keep the labels.
    class_names: names of the (new) labels, in label order.
    labels: the (new) label of each chosen example, in `indices` order, where reading them
      was cheap (an image folder's listing, a class subset or budget, a small split); else
      None.
    orientation: the EXIF orientation (1-8) of every example of `read_split`, in its order,
      for image folders holding rotated photos; else None (all upright).
  """

  builder: tfds.core.DatasetBuilder
  read_split: str
  indices: np.ndarray
  label_map: np.ndarray | None
  class_names: tuple[str, ...]
  labels: np.ndarray | None = None
  orientation: np.ndarray | None = None

  @property
  def num_examples(self) -> int:
    return len(self.indices)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def class_counts(self) -> dict[str, int] | None:
    """Examples per class name (None where the labels were not read)."""
    if self.labels is None:
      return None
    counts = np.bincount(self.labels, minlength=self.num_classes)
    return {name: int(n) for name, n in zip(self.class_names, counts)}

  def describe(self) -> dict:
    """The split for a run's record: what was read, its classes and their counts."""
    found = {
      'split': self.read_split,
      'examples': self.num_examples,
      'classes': list(self.class_names),
      'class_counts': self.class_counts(),
    }
    if isinstance(self.builder, ImageFolder):
      found['ignored_files'] = list(self.builder.listing.ignored)
      found['rotated_photos'] = (
        int((self.orientation != 1).sum()) if self.orientation is not None else 0
      )
    return found


def build_dataset(
  name: str,
  split: str,
  *,
  data_dir: str | None = None,
  download: bool = False,
  fashion_mnist_dir: str | None = None,
  classes: Sequence[int] = (),
  examples_per_class: int = 0,
  seed: int = 0,
) -> DataSplit:
  """Resolves a split of a dataset to the examples it holds.

  Args:
    name: a tfds catalog name, `fashion_mnist` or `image_folder:ROOT` (see `get_builder`).
    split: a tfds split string; slicing allowed (`train[:90%]`, `train[-5000:]`).
    data_dir, download, fashion_mnist_dir: as in `get_builder`.
    classes: keep only these labels, relabelled 0, 1, ... in this order (empty: all).
    examples_per_class: keep the first N examples of each class in an order shuffled by
      `seed` (0: all); the few-shot budget.
    seed: the seed of the budget's order.

  Returns:
    The `DataSplit`, with `num_examples`, `num_classes` and `class_names`.

  Raises:
    DatasetError: see `get_builder`; a split an image folder lacks or an image in it that
      does not decode.
    ValueError: a class out of range or repeated; a class with fewer examples than the
      budget.
  """
  builder = get_builder(
    name, data_dir=data_dir, download=download, fashion_mnist_dir=fashion_mnist_dir
  )
  read_split, indices, labels, orientation = split, None, None, None
  names = tuple(builder.info.features[_keys(builder)[1]].names)
  if isinstance(builder, ImageFolder):
    # ImageFolder reads whole splits only, so slicing becomes a range of indices here.
    try:
      instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(builder.info.splits)
    except (ValueError, KeyError) as e:
      splits = ', '.join(builder.info.splits) or 'none'
      raise DatasetError(f'{split!r} is no split of image folder {name!r} (splits: {splits}): {e}')
    if len({i.splitname for i in instructions}) != 1:
      raise DatasetError(f'{split!r}: image folders read one split at a time')
    read_split = instructions[0].splitname
    orientation = builder.check_and_orient(read_split)
    labels = np.asarray(
      [names.index(label) for _, label in builder.listing.splits[read_split]], np.int64
    )
    size = len(labels)
    indices = np.concatenate([np.arange(size)[i.from_ : i.to] for i in instructions])  # None: open
  label_map = None
  if classes or examples_per_class:
    labels = _read_labels(builder, read_split) if labels is None else labels
    indices = np.arange(len(labels)) if indices is None else indices
    indices, label_map = select(labels, indices, classes, len(names), examples_per_class, seed)
    names = tuple(names[c] for c in classes) if classes else names
  elif indices is None:
    # tfds knows the size of every (sliced) split it reads, mocked ones included.
    indices = np.arange(int(_read(builder, read_split).cardinality()))
    if len(indices) <= COUNT_LABELS_UP_TO:
      labels = _read_labels(builder, read_split)
  if labels is not None:
    labels = labels[indices] if label_map is None else label_map[labels[indices]]
  return DataSplit(builder, read_split, indices, label_map, names, labels, orientation)


def select(
  labels: np.ndarray,
  indices: np.ndarray,
  classes: Sequence[int],
  num_classes: int,
  examples_per_class: int = 0,
  seed: int = 0,
) -> tuple[np.ndarray, np.ndarray | None]:
  """The class subset and per-class budget (see `build_dataset`) on the split's labels.

  Args:
    labels: the label of every example of the split, in order.
    indices: the candidate examples (positions in `labels`).
    classes, examples_per_class, seed: as in `build_dataset`.
    num_classes: the dataset's number of classes.

  Returns:
    The kept indices (ascending) and the map old label -> new label (-1: dropped), or None
    when `classes` is empty.
  """
  classes = [int(c) for c in classes]
  if len(set(classes)) != len(classes) or any(not 0 <= c < num_classes for c in classes):
    raise ValueError(f'classes {classes} must be distinct labels in [0, {num_classes})')
  label_map = None
  if classes:
    label_map = np.full(num_classes, -1, np.int64)
    label_map[classes] = np.arange(len(classes))
    indices = indices[np.isin(labels[indices], classes)]
  if examples_per_class:
    order = indices[np.random.default_rng(seed).permutation(len(indices))]
    kept = []
    for c in classes or range(num_classes):
      of_class = order[labels[order] == c]
      if len(of_class) < examples_per_class:
        raise ValueError(f'class {c} has {len(of_class)} examples, fewer than {examples_per_class}')
      kept.append(of_class[:examples_per_class])
    indices = np.concatenate(kept)
  return np.sort(indices), label_map


def minival_split(split: str, holdout: int | str) -> tuple[str, str]:
  """Carves the end of `split` off as a held-out minival split.

  Args:
    split: an unsliced split name, e.g. `train`.
    holdout: a number of examples (`5000`) or a percentage (`'10%'`).

  Returns:
    `(train_split, minival_split)`, e.g. `('train[:-10%]', 'train[-10%:]')`: disjoint, and
    together the whole split.
  """
  if '[' in split or '+' in split:
    raise ValueError(f'minival is carved from an unsliced split, not {split!r}')
  return f'{split}[:-{holdout}]', f'{split}[-{holdout}:]'


def _keys(builder: tfds.core.DatasetBuilder) -> tuple[str, str]:
  return tuple(builder.info.supervised_keys or ('image', 'label'))


def _read(builder: tfds.core.DatasetBuilder, split: str) -> tf.data.Dataset:
  """The split in its fixed order, images still encoded (decoding only what is kept)."""
  image_key = _keys(builder)[0]
  return builder.as_dataset(
    split=split, shuffle_files=False, decoders={image_key: tfds.decode.SkipDecoding()}
  )


def _read_labels(builder: tfds.core.DatasetBuilder, split: str) -> np.ndarray:
  label_key = _keys(builder)[1]
  batches = _read(builder, split).map(lambda ex: ex[label_key], tf.data.AUTOTUNE).batch(8192)
  return np.concatenate([np.zeros([0], np.int64), *batches.as_numpy_iterator()])


def _examples(data: DataSplit, process_index: int, process_count: int) -> tf.data.Dataset:
  """This process's share of `data`: `{'image': encoded, 'label': int32}` (and
  `'orientation'` for rotated photos), in split order."""
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  image_key, label_key = _keys(data.builder)
  ds = _read(data.builder, data.read_split)
  keep = np.zeros(int(ds.cardinality()), bool)
  keep[data.indices[process_index::process_count]] = True
  keep = tf.constant(keep)
  label_map = None if data.label_map is None else tf.constant(data.label_map)
  orientation = None if data.orientation is None else tf.constant(data.orientation)

  def kept(index, ex):
    return keep[index]

  def relabel(index, ex):
    label = ex[label_key] if label_map is None else tf.gather(label_map, ex[label_key])
    found = {'image': ex[image_key], 'label': tf.cast(label, tf.int32)}
    if orientation is not None:
      found['orientation'] = orientation[index]
    return found

  ds = ds.enumerate().filter(kept).map(relabel)
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


def _decode(data: DataSplit, example: dict) -> tf.Tensor:
  """The example's image, decoded and (for a rotated photo) turned upright."""
  image = data.builder.info.features[_keys(data.builder)[0]].decode_example(example['image'])
  if 'orientation' in example:
    image = exif_transpose(image, example['orientation'])
  return image


def preprocess_image(
  image: tf.Tensor,
  *,
  image_size: int,
  preprocess: str,
  augment: str = 'none',
  seed: tf.Tensor | None = None,
) -> tf.Tensor:
  """One image, uint8 `[h, w, 1 or 3]` RGB -> float32 `[image_size, image_size, 3]`.

  Args:
    image: the decoded image; a grey one is tiled to 3 channels.
    image_size: the output side, pixels.
    preprocess: the weights' convention: `caffe` (BGR minus the ImageNet mean, 0-255 scale),
      `torch` (ImageNet mean and std on [0, 1]) or `unit` ([0, 1]).
    augment: `none`, `flip`, `pad_crop` (pad by image_size // 8, random crop, flip) or
      `resized_crop` (Inception-style random resized crop, flip); training only.
    seed: a stateless seed, shape [2], for the augmentation.
  """
  preprocessing.check(preprocess)
  if augment not in AUGMENTATIONS:
    raise ValueError(f'unknown augmentation {augment!r}; valid: {", ".join(AUGMENTATIONS)}')
  if image.shape[-1] == 1:
    image = tf.tile(image, [1, 1, 3])
  if augment != 'none':
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  if augment == 'resized_crop':
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image),
      bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      seed=crop_seed,
      area_range=(0.08, 1.0),
      aspect_ratio_range=(3 / 4, 4 / 3),
      min_object_covered=0.0,
    )
    image = tf.slice(image, begin, size)
  image = tf.image.resize(image, [image_size, image_size], antialias=True)
  if augment == 'pad_crop':
    pad = image_size // 8
    image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    image = tf.image.stateless_random_crop(image, [image_size, image_size, 3], seed=crop_seed)
  if augment != 'none':
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
  return preprocessing.normalize(image, preprocess)


def local_batch_size(global_batch: int, process_count: int) -> int:
  """This process's share of the global batch."""
  if global_batch % process_count:
    raise ValueError(f'global batch {global_batch} is not divisible by {process_count} processes')
  return global_batch // process_count


def train_iterator(
  data: DataSplit,
  *,
  global_batch: int,
  image_size: int,
  preprocess: str,
  augment: str = 'pad_crop',
  seed: int = 0,
  start_step: int = 0,
  shuffle_buffer: int = 10_000,
  process_index: int = 0,
  process_count: int = 1,
  prefetch: int = 2,
  cache: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
  """Endless shuffled, augmented training batches for this process.

  Epoch e is the split shuffled with a seed made of (`seed`, e), and the epochs are read as
  one stream cut into global batches; process p keeps rows [p*b, (p+1)*b) of each. The
  augmentation of the example at stream position q uses the stateless seed (`seed`, q). So
  the global batches depend on the seed and step only, not on the process count, and
  starting at `start_step` skips at most one epoch of still-encoded records.

  Args:
    data: the split to train on (`build_dataset`).
    global_batch: examples per step over all processes.
    image_size: output side, pixels.
    preprocess: `caffe`, `torch` or `unit`.
    augment: see `preprocess_image`.
    seed: the data seed (order and augmentation).
    start_step: the first step to yield: the number of batches already consumed.
    shuffle_buffer: examples in the shuffle buffer (capped at the share's size).
    process_index, process_count: `jax.process_index()` and `jax.process_count()`.
    prefetch: batches prepared ahead.
    cache: keep this process's share in memory, still encoded (off for splits bigger than RAM).

  Returns:
    An iterator of `{'image': [b, image_size, image_size, 3] float32, 'label': [b] int32}`,
    with b = global_batch // process_count.
  """
  batch = local_batch_size(global_batch, process_count)
  share = _examples(data, 0, 1)
  if cache:
    # The encoded records, read once: without this, every epoch rereads the whole split to
    # filter it again (seconds per epoch for a few-shot subset of a large split).
    share = share.cache()

  def train_example(position, ex):
    pair = tf.stack([tf.constant(seed, tf.int64), position])
    image = preprocess_image(
      _decode(data, ex),
      image_size=image_size,
      preprocess=preprocess,
      augment=augment,
      seed=pair,
    )
    return {'image': image, 'label': ex['label']}

  ds = _train_stream(
    share,
    data.num_examples,
    global_batch=global_batch,
    seed=seed,
    start_step=start_step,
    shuffle_buffer=shuffle_buffer,
    process_index=process_index,
    process_count=process_count,
  )
  ds = ds.map(train_example, tf.data.AUTOTUNE)
  return ds.batch(batch, drop_remainder=True).prefetch(prefetch).as_numpy_iterator()


def train_indices(
  num_examples: int,
  *,
  global_batch: int,
  seed: int = 0,
  start_step: int = 0,
  shuffle_buffer: int = 10_000,
  process_index: int = 0,
  process_count: int = 1,
  prefetch: int = 2,
) -> Iterator[np.ndarray]:
  """Which examples `train_iterator` puts in each batch, without reading any of them.

  With the same `global_batch`, `seed`, `start_step`, `shuffle_buffer` and process arguments,
  batch k holds the examples at these positions (in `DataSplit.indices` order, 0..n-1) in
  this order: tf.data's shuffle draws do not depend on what the elements are, so shuffling
  the positions shuffles the same way as shuffling the records. A cache of per-example
  values (`ftlab.activation_cache`) replays a run's data order with this.

  Returns:
    An iterator of int64 `[global_batch // process_count]` position arrays.
  """
  batch = local_batch_size(global_batch, process_count)
  ds = _train_stream(
    tf.data.Dataset.range(num_examples),
    num_examples,
    global_batch=global_batch,
    seed=seed,
    start_step=start_step,
    shuffle_buffer=shuffle_buffer,
    process_index=process_index,
    process_count=process_count,
  )
  ds = ds.map(lambda position, index: index)
  return ds.batch(batch, drop_remainder=True).prefetch(prefetch).as_numpy_iterator()


def _train_stream(
  share: tf.data.Dataset,
  size: int,
  *,
  global_batch: int,
  seed: int,
  start_step: int,
  shuffle_buffer: int,
  process_index: int,
  process_count: int,
) -> tf.data.Dataset:
  """`share` (the split's `size` elements, in split order) shuffled per epoch, read as one
  stream from step `start_step` on: this process's `(stream position, element)` pairs."""
  batch = local_batch_size(global_batch, process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  if size == 0:
    raise ValueError('the training split has no examples')
  # Every process walks the same global stream of (still encoded) examples and keeps its
  # rows of each global batch, so the global batches, and so the run, do not depend on how
  # many processes share them.
  first_epoch, offset = divmod(start_step * global_batch, size)

  def epoch(e):
    # Distinct seeds per (seed, epoch); int64 leaves room for any realistic epoch count.
    return share.shuffle(min(shuffle_buffer, size), seed=seed * 1_000_003 + e)

  def mine(position, ex):
    del ex
    return (position % global_batch) // batch == process_index

  with _no_global_tf_seed():  # the shuffles' seeds are fixed when flat_map traces `epoch`
    ds = tf.data.Dataset.counter(first_epoch).flat_map(epoch).skip(offset)
  ds = ds.enumerate(start=start_step * global_batch)
  if process_count > 1:
    ds = ds.filter(mine)
  return ds


@contextlib.contextmanager
def _no_global_tf_seed():
  """Builds datasets as if no TensorFlow global seed were set, then restores it.

  With a global seed (`tf.random.set_seed`, `keras.utils.set_random_seed`), tf.data's
  shuffle mixes it into its seed, so the data order would depend on what else ran in the
  process, and its seed check fails on the per-epoch tensor seeds. Restoring a seed restarts
  TensorFlow's own sequence of op seeds, as `tf.random.set_seed` does.
  """
  seed = tf_context.global_seed()
  if seed is None:
    yield
    return
  tf_context.set_global_seed(None)
  try:
    yield
  finally:
    tf_context.set_global_seed(seed)


def num_eval_steps(num_examples: int, global_batch: int) -> int:
  """Batches that cover `num_examples` once: the same on every process."""
  return -(-num_examples // global_batch)


def eval_iterator(
  data: DataSplit,
  *,
  global_batch: int,
  image_size: int,
  preprocess: str,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
  """Every example of `data` exactly once, over all processes, in padded batches.

  Each process yields `num_eval_steps(data.num_examples, global_batch)` batches; its last
  real batch is padded with zeros and the rest are all padding, so every process runs the
  same number of steps. Sum a metric times `'mask'` and divide by the sum of masks.

  Args:
    data: the split to evaluate (`build_dataset`).
    global_batch: examples per step over all processes.
    image_size: output side, pixels.
    preprocess: `caffe`, `torch` or `unit`.
    process_index, process_count: `jax.process_index()` and `jax.process_count()`.

  Returns:
    An iterator of `{'image': [b, H, W, 3] float32, 'label': [b] int32, 'mask': [b] float32}`,
    with b = global_batch // process_count and mask 1.0 for real examples, 0.0 for padding.
  """
  batch = local_batch_size(global_batch, process_count)
  steps = num_eval_steps(data.num_examples, global_batch)

  def eval_example(ex):
    image = preprocess_image(_decode(data, ex), image_size=image_size, preprocess=preprocess)
    return {'image': image, 'label': ex['label'], 'mask': tf.ones([], tf.float32)}

  ds = _examples(data, process_index, process_count).map(eval_example, tf.data.AUTOTUNE)
  zeros = {
    'image': np.zeros([batch, image_size, image_size, 3], np.float32),
    'label': np.zeros([batch], np.int32),
    'mask': np.zeros([batch], np.float32),
  }
  return _padded(ds.batch(batch).prefetch(2).as_numpy_iterator(), zeros, steps)


def _padded(batches: Iterator[dict], zeros: dict, steps: int) -> Iterator[dict]:
  """`batches` padded with `zeros` to full batches, then all-zero batches up to `steps`."""
  done = 0
  for real in batches:
    n = len(real['mask'])
    yield {k: np.concatenate([v, zeros[k][n:]]) for k, v in real.items()}
    done += 1
  for _ in range(steps - done):
    yield {k: v.copy() for k, v in zeros.items()}
