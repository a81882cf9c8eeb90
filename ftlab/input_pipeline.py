"""Splits -> host-local numpy batches: preprocessing, augmentation, the data order, exact eval.

`train_iterator`'s batches are a function of the `BatchOrder` (global batch, seed, shuffle
buffer) and the step alone, so a run resumed at step k sees what an uninterrupted run would,
and the global batches do not depend on how many processes share them; `train_indices` names
their examples without reading them (for caches of per-example values). `eval_iterator` yields
every example once, padded with a `'mask'`, in the same number of batches on every process.
Records are filtered and shuffled still encoded, and decoded only when a batch uses them.

`Data` is what a run reads: its splits, its order and how images are prepared, built once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Callable, Iterator, Mapping

import numpy as np
import tensorflow as tf
from tensorflow.python.eager import context as tf_context

from ftlab import datasets, preprocessing
from ftlab.datasets import DataSplit

PREPROCESSING = preprocessing.CONVENTIONS
AUGMENTATIONS = ('none', 'flip', 'pad_crop', 'resized_crop')  # both crops also flip


@dataclasses.dataclass(frozen=True)
class BatchOrder:
  """Which examples go into which batch, on which process.

  Attributes:
    global_batch: examples per step over all processes.
    seed: the data seed (shuffle order and augmentation).
    shuffle_buffer: examples in the shuffle buffer (capped at the split's size).
    process_index, process_count: `jax.process_index()` and `jax.process_count()`.
  """

  global_batch: int
  seed: int = 0
  shuffle_buffer: int = 10_000
  process_index: int = 0
  process_count: int = 1

  def __post_init__(self):
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f'process_index {self.process_index} not in [0, {self.process_count})')
    if self.global_batch % self.process_count:
      raise ValueError(
        f'global batch {self.global_batch} is not divisible by {self.process_count} processes'
      )

  @property
  def local_batch(self) -> int:
    """This process's share of the global batch."""
    return self.global_batch // self.process_count

  def with_batch(self, global_batch: int) -> BatchOrder:
    return dataclasses.replace(self, global_batch=global_batch)


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


def _examples(data: DataSplit, process_index: int, process_count: int) -> tf.data.Dataset:
  """This process's share of `data`: `{'image': encoded, 'label': int32}` (and
  `'orientation'` for rotated photos), in split order."""
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  image_key, label_key = datasets.keys(data.builder)
  ds = datasets.read(data.builder, data.read_split)
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
  image = data.builder.info.features[datasets.keys(data.builder)[0]].decode_example(
    example['image']
  )
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


def train_iterator(
  data: DataSplit,
  order: BatchOrder,
  *,
  image_size: int,
  preprocess: str,
  augment: str = 'pad_crop',
  start_step: int = 0,
  prefetch: int = 2,
  cache: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
  """Endless shuffled, augmented training batches for this process.

  Epoch e is the split shuffled with a seed made of (`order.seed`, e), and the epochs are read
  as one stream cut into global batches; process p keeps rows [p*b, (p+1)*b) of each. The
  augmentation of the example at stream position q uses the stateless seed (seed, q). So the
  global batches depend on the seed and step only, not on the process count, and starting at
  `start_step` skips at most one epoch of still-encoded records.

  Args:
    data: the split to train on (`datasets.build_dataset`).
    order: the batch size, seed, shuffle buffer and this process's place.
    image_size: output side, pixels.
    preprocess: `caffe`, `torch` or `unit`.
    augment: see `preprocess_image`.
    start_step: the first step to yield: the number of batches already consumed.
    prefetch: batches prepared ahead.
    cache: keep the split in memory, still encoded (off for splits bigger than RAM).

  Returns:
    An iterator of `{'image': [b, image_size, image_size, 3] float32, 'label': [b] int32}`,
    with b = `order.local_batch`.
  """
  share = _examples(data, 0, 1)
  if cache:
    # The encoded records, read once: without this, every epoch rereads the whole split to
    # filter it again (seconds per epoch for a few-shot subset of a large split).
    share = share.cache()

  def train_example(position, ex):
    pair = tf.stack([tf.constant(order.seed, tf.int64), position])
    image = preprocess_image(
      _decode(data, ex),
      image_size=image_size,
      preprocess=preprocess,
      augment=augment,
      seed=pair,
    )
    return {'image': image, 'label': ex['label']}

  ds = _train_stream(share, data.num_examples, order, start_step)
  ds = ds.map(train_example, tf.data.AUTOTUNE)
  return ds.batch(order.local_batch, drop_remainder=True).prefetch(prefetch).as_numpy_iterator()


def train_indices(
  num_examples: int, order: BatchOrder, *, start_step: int = 0, prefetch: int = 2
) -> Iterator[np.ndarray]:
  """Which examples `train_iterator` puts in each batch, without reading any of them.

  With the same `order` and `start_step`, batch k holds the examples at these positions (in
  `DataSplit.indices` order, 0..n-1) in this order: tf.data's shuffle draws do not depend on
  what the elements are, so shuffling the positions shuffles the same way as shuffling the
  records. A cache of per-example values (`ftlab.activation_cache`) replays a run's data order
  with this.

  Returns:
    An iterator of int64 `[order.local_batch]` position arrays.
  """
  ds = _train_stream(tf.data.Dataset.range(num_examples), num_examples, order, start_step)
  ds = ds.map(lambda position, index: index)
  return ds.batch(order.local_batch, drop_remainder=True).prefetch(prefetch).as_numpy_iterator()


def _train_stream(
  share: tf.data.Dataset, size: int, order: BatchOrder, start_step: int
) -> tf.data.Dataset:
  """`share` (the split's `size` elements, in split order) shuffled per epoch, read as one
  stream from step `start_step` on: this process's `(stream position, element)` pairs."""
  if size == 0:
    raise ValueError('the training split has no examples')
  global_batch, batch = order.global_batch, order.local_batch
  # Every process walks the same global stream of (still encoded) examples and keeps its
  # rows of each global batch, so the global batches, and so the run, do not depend on how
  # many processes share them.
  first_epoch, offset = divmod(start_step * global_batch, size)

  def epoch(e):
    # Distinct seeds per (seed, epoch); int64 leaves room for any realistic epoch count.
    return share.shuffle(min(order.shuffle_buffer, size), seed=order.seed * 1_000_003 + e)

  def mine(position, ex):
    del ex
    return (position % global_batch) // batch == order.process_index

  with _no_global_tf_seed():  # the shuffles' seeds are fixed when flat_map traces `epoch`
    ds = tf.data.Dataset.counter(first_epoch).flat_map(epoch).skip(offset)
  ds = ds.enumerate(start=start_step * global_batch)
  if order.process_count > 1:
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
  data: DataSplit, order: BatchOrder, *, image_size: int, preprocess: str
) -> Iterator[dict[str, np.ndarray]]:
  """Every example of `data` exactly once, over all processes, in padded batches.

  Each process yields `num_eval_steps(data.num_examples, order.global_batch)` batches; its last
  real batch is padded with zeros and the rest are all padding, so every process runs the
  same number of steps. Sum a metric times `'mask'` and divide by the sum of masks. Only the
  order's batch size and process place matter (nothing is shuffled).

  Returns:
    An iterator of `{'image': [b, H, W, 3] float32, 'label': [b] int32, 'mask': [b] float32}`,
    with b = `order.local_batch` and mask 1.0 for real examples, 0.0 for padding.
  """
  batch = order.local_batch
  steps = num_eval_steps(data.num_examples, order.global_batch)

  def eval_example(ex):
    image = preprocess_image(_decode(data, ex), image_size=image_size, preprocess=preprocess)
    return {'image': image, 'label': ex['label'], 'mask': tf.ones([], tf.float32)}

  ds = _examples(data, order.process_index, order.process_count)
  ds = ds.map(eval_example, tf.data.AUTOTUNE)
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


@dataclasses.dataclass(frozen=True, eq=False)
class Data:
  """What a run reads: its splits and how they become batches, built once.

  Attributes:
    train: the training split.
    evals: evaluated splits by name: `eval`, and `minival` when one is held out.
    order: the training batches' order (`BatchOrder`).
    eval_batch: the global eval batch size.
    image_size: side of the model's input, pixels.
    preprocess: the weights' input convention (`ftlab.preprocessing`).
    augment: the training augmentation (`preprocess_image`).
    dataset: the dataset's name (`datasets.build_dataset`), for records.
  """

  train: DataSplit
  evals: Mapping[str, DataSplit]
  order: BatchOrder
  eval_batch: int
  image_size: int
  preprocess: str
  augment: str
  dataset: str = ''

  @property
  def held_out(self) -> str:
    """The split that picks the best step and stops early: `minival` if any, else `eval`."""
    return 'minival' if 'minival' in self.evals else 'eval'

  def train_batches(self, start_step: int, augment: str | None = None) -> Iterator[dict]:
    """`train_iterator` from `start_step`, augmented as configured unless `augment` says."""
    return train_iterator(
      self.train,
      self.order,
      image_size=self.image_size,
      preprocess=self.preprocess,
      augment=self.augment if augment is None else augment,
      start_step=start_step,
    )

  def eval_batches(self, name: str, global_batch: int | None = None) -> Iterator[dict]:
    """`eval_iterator` over split `name` (`train` too: every training example once)."""
    split = self.train if name == 'train' else self.evals[name]
    order = self.order.with_batch(global_batch or self.eval_batch)
    return eval_iterator(split, order, image_size=self.image_size, preprocess=self.preprocess)

  def eval_sources(self) -> dict[str, Callable[[], Iterator[dict]]]:
    """`{name: () -> batches}` of every evaluated split."""
    return {name: functools.partial(self.eval_batches, name) for name in self.evals}

  def describe(self) -> dict:
    """Every split's record (`DataSplit.describe`), for the run's `data.json`."""
    return {'train': self.train.describe(), **{k: d.describe() for k, d in self.evals.items()}}
