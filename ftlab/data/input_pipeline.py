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
import tensorflow_datasets as tfds
from tensorflow.python.eager import context as tf_context

from ftlab.data import labels, preprocessing, sources
from ftlab.data.datasets import DataSplit
from ftlab.errors import ConfigError

PREPROCESSING = preprocessing.CONVENTIONS
AUGMENTATIONS = ('none', 'flip', 'pad_crop', 'resized_crop')  # both crops also flip


@dataclasses.dataclass(frozen=True)
class BatchOrder:
  """Which examples go into which batch, on which process.

  The training split is cut into `shards` contiguous parts of its examples; each part is
  shuffled on its own and fills its `global_batch / shards` rows of every global batch
  (shard 0 the first rows). Process p holds rows [p*b, (p+1)*b) of each global batch
  (b = `local_batch`) and reads only the shards those rows come from: with `shards` a
  multiple of the process count, a 1/process_count share of the records. The batches depend
  on the seed, the shards and the step, never on the process count.

  Attributes:
    global_batch: examples per step over all processes.
    seed: the data seed (shuffle order and augmentation).
    shuffle_buffer: examples in the shuffle buffer (capped at the shard's size).
    process_index, process_count: `jax.process_index()` and `jax.process_count()`.
    shards: parts of the training split (1: one shuffle of the whole split, read by every
      process).
  """

  global_batch: int
  seed: int = 0
  shuffle_buffer: int = 10_000
  process_index: int = 0
  process_count: int = 1
  shards: int = 1

  def __post_init__(self):
    if not 0 <= self.process_index < self.process_count:
      raise ConfigError(f'process_index {self.process_index} not in [0, {self.process_count})')
    if self.global_batch % self.process_count:
      raise ConfigError(
        f'global batch {self.global_batch} is not divisible by {self.process_count} processes'
      )
    if self.shards < 1 or self.global_batch % self.shards:
      raise ConfigError(
        f'data shards {self.shards}: need a divisor of the global batch {self.global_batch} '
        f'(e.g. {self.process_count}, one per process)'
      )

  @property
  def local_batch(self) -> int:
    """This process's share of the global batch."""
    return self.global_batch // self.process_count

  def with_batch(self, global_batch: int) -> BatchOrder:
    return dataclasses.replace(self, global_batch=global_batch)

  def shard_rows(self) -> list[tuple[int, int, int]]:
    """`(shard, first, end)`: the shards holding this process's rows of a global batch, in
    row order, with the rows [first, end) it takes of each one's `global_batch / shards`."""
    b = self.global_batch // self.shards
    lo, hi = self.process_index * self.local_batch, (self.process_index + 1) * self.local_batch
    # The shards whose row ranges [j*b, (j+1)*b) meet this process's rows [lo, hi): from the
    # one holding row lo to the one holding row hi - 1 (a ceiling division), each clipped.
    return [
      (j, max(lo, j * b) - j * b, min(hi, (j + 1) * b) - j * b) for j in range(lo // b, -(-hi // b))
    ]


def parts(num_examples: int, count: int) -> list[np.ndarray]:
  """Positions 0..num_examples-1 cut into `count` contiguous parts (sizes differ by <= 1):
  the training split's shards, and each process's share of an eval split."""
  return np.array_split(np.arange(num_examples), count)


def narrow(data: DataSplit, positions: np.ndarray) -> DataSplit:
  """The examples of `data` at `positions` (ascending, into `data.indices`), as a split that
  reads only the records from the first to the last of them (per part of a `a+b` split).

  tfds reads a slice through the files that hold it, so a process reading its share of a
  split stored in many files (ImageNet's 1,024) opens about its share of them. Image folders
  are listed whole (`sources.ImageFolder` reads whole splits), as are splits whose sizes
  tfds does not record (its mock data); their records are filtered, not narrowed.
  """
  chosen = data.indices[positions]
  labels = None if data.labels is None else data.labels[positions]
  whole = dataclasses.replace(data, indices=chosen, labels=labels)
  splits = data.builder.info.splits
  try:
    instructions = tfds.core.ReadInstruction.from_spec(data.read_split).to_absolute(splits)
  except (ValueError, KeyError):  # no split sizes recorded (tfds' mock data): read it whole
    return whole
  if isinstance(data.builder, sources.ImageFolder) or not len(chosen):
    return whole
  # One slice per part, from its first chosen record to its last: tfds reads slices, not
  # lists of records, so the records in between are read too and filtered out by `indices`.
  specs, indices, start, offset = [], [], 0, 0
  for part in instructions:
    base = part.from_ or 0
    # `to is None` is an open end: the part runs to the end of its split.
    size = (splits[part.splitname].num_examples if part.to is None else part.to) - base
    mine = chosen[(chosen >= start) & (chosen < start + size)] - start
    if len(mine):
      lo, hi = int(mine[0]), int(mine[-1]) + 1
      specs.append(f'{part.splitname}[{base + lo}:{base + hi}]')
      indices.append(offset + mine - lo)
      offset += hi - lo
    start += size
  return dataclasses.replace(
    data, read_split='+'.join(specs), indices=np.concatenate(indices), labels=labels
  )


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
  # An out-of-range tag falls back to a branch rather than failing inside the pipeline;
  # `sources.ImageFolder.check_and_orient` already maps such tags to 1 (upright).
  return tf.switch_case(tf.clip_by_value(orientation - 1, 0, 7), branches)


def _examples(data: DataSplit) -> tf.data.Dataset:
  """Every example of `data`: `{'image': encoded, 'label': int32}` (and `'orientation'` for
  rotated photos), in split order."""
  image_key = sources.keys(data.builder)[0]
  label_of = (data.label or labels.resolve('', data.builder)).of
  ds = sources.read(data.builder, data.read_split)
  # A boolean table indexed by record position, as a TF constant: the filter runs on encoded
  # records, so unchosen examples are never decoded.
  keep = np.zeros(int(ds.cardinality()), bool)
  keep[data.indices] = True
  keep = tf.constant(keep)
  label_map = None if data.label_map is None else tf.constant(data.label_map)
  orientation = None if data.orientation is None else tf.constant(data.orientation)

  def kept(index, ex):
    return keep[index]

  def relabel(index, ex):
    label = tf.cast(label_of(ex), tf.int64)
    label = label if label_map is None else tf.gather(label_map, label)
    found = {'image': ex[image_key], 'label': tf.cast(label, tf.int32)}
    if orientation is not None:
      found['orientation'] = orientation[index]
    return found

  ds = ds.enumerate().filter(kept).map(relabel)
  options = tf.data.Options()
  # Explicit, so a parallel `map` downstream yields in input order whatever the defaults (or
  # an `experimental_deterministic` set elsewhere): batches must be a function of the step.
  options.deterministic = True
  return ds.with_options(options)


def _decode(data: DataSplit, example: dict) -> tf.Tensor:
  """The example's image, decoded and (for a rotated photo) turned upright."""
  image = data.builder.info.features[sources.keys(data.builder)[0]].decode_example(example['image'])
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
    raise ConfigError(f'unknown augmentation {augment!r}; valid: {", ".join(AUGMENTATIONS)}')
  # The static channel count: grey datasets (Fashion-MNIST) feed the same 3-channel model as
  # colour ones, with the same values in every channel.
  if image.shape[-1] == 1:
    image = tf.tile(image, [1, 1, 3])
  if augment != 'none':
    # Stateless ops seeded by the example's stream position: the same example at the same step
    # gets the same crop after a resume, whatever thread or process prepares it.
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  if augment == 'resized_crop':
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image),
      bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      seed=crop_seed,
      # Inception's ranges, as torchvision's `RandomResizedCrop` defaults; no object box, so
      # any crop with that area and aspect is allowed.
      area_range=(0.08, 1.0),
      aspect_ratio_range=(3 / 4, 4 / 3),
      min_object_covered=0.0,
    )
    image = tf.slice(image, begin, size)
  # Antialiased, as PIL's resize (the reference frameworks' loaders) is: downscaling large
  # photos without it aliases fine texture.
  image = tf.image.resize(image, [image_size, image_size], antialias=True)
  if augment == 'pad_crop':
    # 4 pixels at 32x32: the CIFAR padding convention, scaled to the image size.
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

  Epoch e of each shard (`BatchOrder`) is the shard shuffled with a seed made of
  (`order.seed`, shard, e), and its epochs are read as one stream cut into its rows of the
  global batches; process p keeps rows [p*b, (p+1)*b) of each global batch and reads only
  the shards they come from. The augmentation of the example at global stream position q
  uses the stateless seed (seed, q). So the global batches depend on the seed, the shards
  and the step only, not on the process count, and starting at `start_step` skips at most
  one epoch of still-encoded records.

  Args:
    data: the split to train on (`datasets.build_dataset`).
    order: the batch size, seed, shuffle buffer and this process's place.
    image_size: output side, pixels.
    preprocess: `caffe`, `torch` or `unit`.
    augment: see `preprocess_image`.
    start_step: the first step to yield: the number of batches already consumed.
    prefetch: batches prepared ahead.
    cache: keep the process's shards in memory, still encoded (off where they outgrow RAM).

  Returns:
    An iterator of `{'image': [b, image_size, image_size, 3] float32, 'label': [b] int32}`,
    with b = `order.local_batch`.
  """

  def records(positions):
    share = _examples(narrow(data, positions))
    # The encoded records, read once: without this, every epoch rereads the shard to filter
    # it again (seconds per epoch for a few-shot subset of a large split).
    return share.cache() if cache else share

  def train_example(position, ex):
    # The augmentation's seed is (data seed, global stream position), never a process-local
    # counter, so the images of a global batch do not depend on the process count.
    pair = tf.stack([tf.constant(order.seed, tf.int64), position])
    image = preprocess_image(
      _decode(data, ex),
      image_size=image_size,
      preprocess=preprocess,
      augment=augment,
      seed=pair,
    )
    return {'image': image, 'label': ex['label']}

  ds = _batches(records, data.num_examples, order, start_step, train_example)
  return ds.prefetch(prefetch).as_numpy_iterator()


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
  records = lambda positions: tf.data.Dataset.from_tensor_slices(positions)
  ds = _batches(records, num_examples, order, start_step, lambda position, index: index)
  return ds.prefetch(prefetch).as_numpy_iterator()


def _batches(
  records: Callable[[np.ndarray], tf.data.Dataset],
  size: int,
  order: BatchOrder,
  start_step: int,
  prepare: Callable,
) -> tf.data.Dataset:
  """This process's batches from step `start_step` on: the rows of each of its shards
  (`BatchOrder.shard_rows`), `prepare(stream position, record)`d, side by side.

  `records(positions)` gives the records at those positions of the split, in order. Shard j
  is shuffled per epoch with a seed made of (`order.seed`, j, epoch), and its epochs are read
  as one stream; its t-th element fills row t mod r of shard j's r rows of global batch
  t div r, so its position in the global stream (the augmentation's seed) is
  (t div r) * global_batch + j * r + t mod r, the same for any process count.
  """
  if size == 0:
    raise ConfigError('the training split has no examples')
  if size < order.shards:
    raise ConfigError(f'{order.shards} data shards for {size} training examples; use fewer')
  rows, shard_positions, streams = order.global_batch // order.shards, parts(size, order.shards), []
  for j, first, end in order.shard_rows():
    positions = shard_positions[j]
    n = len(positions)
    # A resume starts at the epoch holding its first record and skips at most one epoch of
    # still-encoded records, instead of replaying every step before it.
    first_epoch, offset = divmod(start_step * rows, n)

    # Default arguments bind this shard's values now (the loop would rebind the names), and
    # `records(positions)` is called once per shard, so every epoch reuses one cached dataset.
    def epoch(e, share=records(positions), n=n, j=j):
      # Distinct seeds per (seed, shard, epoch) in int64; shard 0 keeps one shard's seeds.
      seed = order.seed * 1_000_003 + e + j * 2**32
      return share.shuffle(min(order.shuffle_buffer, n), seed=seed)

    def global_position(t, ex, j=j):
      return (t // rows) * order.global_batch + j * rows + t % rows, ex

    with _no_global_tf_seed():  # the shuffles' seeds are fixed when flat_map traces `epoch`
      ds = tf.data.Dataset.counter(first_epoch).flat_map(epoch).skip(offset)
    # Numbered from the shard's position in its endless stream, so `t` (and the augmentation
    # seed derived from it) is the same whether the run started here or at step 0.
    ds = ds.enumerate(start=start_step * rows)
    if (first, end) != (0, rows):  # rows of this shard that other processes take
      ds = ds.filter(lambda t, ex, first=first, end=end: (first <= t % rows) & (t % rows < end))
    ds = ds.map(global_position).map(prepare, tf.data.AUTOTUNE)
    # The streams are endless, so nothing is dropped; `drop_remainder` gives the batch a static
    # size, which the zip and concatenation below (and the compiled step) rely on.
    streams.append(ds.batch(end - first, drop_remainder=True))
  if len(streams) == 1:
    return streams[0]
  # The shards' rows side by side, in shard order: this process's rows of the global batch in
  # row order.
  concat = lambda *batches: tf.nest.map_structure(lambda *x: tf.concat(x, 0), *batches)
  return tf.data.Dataset.zip(tuple(streams)).map(concat)


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


def eval_share(num_examples: int, order: BatchOrder) -> np.ndarray:
  """The positions (into `DataSplit.indices`) this process evaluates: its contiguous part."""
  return parts(num_examples, order.process_count)[order.process_index]


def gathered_positions(
  num_examples: int, process_count: int, local_batch: int, step: int
) -> np.ndarray:
  """The split positions of the rows of eval step `step` gathered over processes (process q's
  `local_batch` rows after process q-1's, as `lax.all_gather(..., tiled=True)` stacks
  them), -1 for padding rows: where each output of an `eval_iterator` batch belongs."""
  sizes = np.array([len(p) for p in parts(num_examples, process_count)])
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  q, r = np.divmod(np.arange(process_count * local_batch), local_batch)
  # Process q's part holds `sizes[q]` examples; a row beyond them is padding.
  offset = step * local_batch + r
  return np.where(offset < sizes[q], starts[q] + offset, -1)


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

  # A contiguous part per process: every example is read by exactly one process, and the
  # parts' sizes differ by at most one, so padding is at most one batch's worth per process.
  ds = _examples(narrow(data, eval_share(data.num_examples, order)))
  ds = ds.map(eval_example, tf.data.AUTOTUNE)
  zeros = {
    'image': np.zeros([batch, image_size, image_size, 3], np.float32),
    'label': np.zeros([batch], np.int32),
    'mask': np.zeros([batch], np.float32),
  }
  # Every process yields `steps` batches, even one with fewer examples: the eval step is a
  # collective, and a process that stopped early would leave the others waiting.
  return _padded(ds.batch(batch).prefetch(2).as_numpy_iterator(), zeros, steps)


def _padded(batches: Iterator[dict], zeros: dict, steps: int) -> Iterator[dict]:
  """`batches` padded with `zeros` to full batches, then all-zero batches up to `steps`."""
  done = 0
  for real in batches:
    n = len(real['mask'])
    yield {k: np.concatenate([v, zeros[k][n:]]) for k, v in real.items()}
    done += 1
  for _ in range(steps - done):
    # Fresh arrays per batch: no two yielded batches share a buffer that a consumer might keep
    # or write into.
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
    preprocess: the weights' input convention (`ftlab.data.preprocessing`).
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
