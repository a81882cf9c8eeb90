"""The examples of a split: slicing, class subset, per-class budget, minival.

`build_dataset` resolves a split of a named dataset (`ftlab.data.sources`) to a `DataSplit`:
the positions of the chosen examples in the split's fixed order, their labels where reading
them is cheap, and the EXIF orientation of rotated photos. Every process computes the same
`DataSplit`. What batches are made of it is `ftlab.data.input_pipeline`'s business.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ftlab.data import labels as labels_
from ftlab.data.sources import (
  COUNT_LABELS_UP_TO,
  DatasetError,
  ImageFolder,
  get_builder,
  read,
  read_labels,
)


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
    spec: the split as asked for (`test[:10%]`), for records.
    classes: the labels kept, in their new order (empty: all).
    label: what the label is (`ftlab.data.labels`); None: the dataset's supervised label.
  """

  builder: tfds.core.DatasetBuilder
  read_split: str
  indices: np.ndarray
  label_map: np.ndarray | None
  class_names: tuple[str, ...]
  labels: np.ndarray | None = None
  orientation: np.ndarray | None = None
  spec: str = ''
  classes: tuple[int, ...] = ()
  label: labels_.Label | None = None

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
    if self.label is not None and self.label.spec:
      found['label'] = self.label.spec
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
  budget_name: str = 'dataset.examples_per_class',
  label: str = '',
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
    budget_name: the setting the budget comes from, for its error (the few-shot probe's
      `evals.fewshot.shots` draws with this function too).
    label: what the label is, a `dataset.label` form (`ftlab.data.labels`: '' the dataset's
      own, 'key:F', 'bins:F:N', VTAB's computed labels); image folders have only their own.

  Returns:
    The `DataSplit`, with `num_examples`, `num_classes` and `class_names`.

  Raises:
    DatasetError: see `get_builder`; a split the dataset lacks; an image in a folder that
      does not decode; a class out of range or repeated; a class with fewer examples than
      the budget.
    LabelError: a `label` the dataset cannot give (`labels.resolve`).
  """
  builder = get_builder(
    name, data_dir=data_dir, download=download, fashion_mnist_dir=fashion_mnist_dir
  )
  read_split, indices, labels, orientation = split, None, None, None
  if label and isinstance(builder, ImageFolder):
    raise labels_.LabelError(
      f'dataset.label={label!r}: image folder {name!r} has only its folder names as labels; '
      "valid: ''"
    )
  found_label = labels_.resolve(label, builder)
  names = found_label.names
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
  if indices is None:
    try:
      # tfds knows the size of every (sliced) split it reads, mocked ones included.
      indices = np.arange(int(read(builder, read_split).cardinality()))
    except (ValueError, KeyError, tf.errors.OpError) as e:  # tfds' errors for a bad split
      splits = ', '.join(builder.info.splits) or 'none'
      reason = str(e.args[0] if e.args else e).splitlines()[0]
      raise DatasetError(f'{split!r} is no split of {name!r} (splits: {splits}): {reason}')
    # Labels are read (one pass over the split) only where they are needed to choose examples,
    # or where the pass is cheap; a large split keeps `labels` None and the record says so.
    if (classes or examples_per_class or len(indices) <= COUNT_LABELS_UP_TO) and labels is None:
      labels = read_labels(builder, read_split, found_label)
  if classes or examples_per_class:
    try:
      indices, label_map = select(labels, indices, classes, len(names), examples_per_class, seed)
    except ShortClass as e:  # named here, where the class names and the split are known
      raise DatasetError(
        f'{budget_name}={examples_per_class}: class {names[e.label]!r} has {e.count} '
        f'examples in {split!r} of {name}, fewer than {examples_per_class}; lower it, or give '
        'the class more data'
      ) from None
    names = tuple(names[c] for c in classes) if classes else names
  if labels is not None:
    labels = labels[indices] if label_map is None else label_map[labels[indices]]
  return DataSplit(
    builder,
    read_split,
    indices,
    label_map,
    names,
    labels,
    orientation,
    split,
    tuple(classes),
    found_label,
  )


class ShortClass(DatasetError):
  """A class with fewer examples than a per-class budget (`select`)."""

  def __init__(self, label: int, count: int, budget: int):
    super().__init__(f'class {label} has {count} examples, fewer than {budget}')
    self.label, self.count, self.budget = label, count, budget


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
    raise DatasetError(f'classes {classes} must be distinct labels in [0, {num_classes})')
  label_map = None
  if classes:
    label_map = np.full(num_classes, -1, np.int64)
    label_map[classes] = np.arange(len(classes))
    indices = indices[np.isin(labels[indices], classes)]
  if examples_per_class:
    # One seeded order for all classes, then the first N of each: a larger budget keeps every
    # example a smaller one chose, so shot counts compare on nested sets.
    order = indices[np.random.default_rng(seed).permutation(len(indices))]
    kept = []
    for c in classes or range(num_classes):
      of_class = order[labels[order] == c]
      if len(of_class) < examples_per_class:
        raise ShortClass(c, len(of_class), examples_per_class)
      kept.append(of_class[:examples_per_class])
    indices = np.concatenate(kept)
  # Ascending: the pipeline filters records in file order, and `narrow` reads the range from
  # the first chosen record to the last.
  return np.sort(indices), label_map


def minival_split(split: str, holdout: int | str) -> tuple[str, str]:
  """The training and minival splits: the end of `split` held out, or a split of its own.

  Args:
    split: the training split. Unsliced (`train`) when `holdout` is a size.
    holdout: a number of examples (`5000`) or a percentage (`'10%'`) held out of the end of
      `split`; or a split string of its own (`'validation[:200]'`, VTAB-1k's `val200`), used
      as given (`check_disjoint` then checks it shares no example with `split`).

  Returns:
    `(train_split, minival_split)`, e.g. `('train[:-10%]', 'train[-10%:]')`: disjoint, and
    together the whole split.
  """
  text = str(holdout).strip()
  if text[:1].isalpha():  # a split name: the minival split as written
    return split, text
  if '[' in split or '+' in split:
    raise DatasetError(
      f'minival is carved from an unsliced split, not {split!r}; name a split of its own '
      "instead (dataset.minival='validation[:200]')"
    )
  amount = text[:-1] if text.endswith('%') else text
  try:
    value = float(amount) if text.endswith('%') else int(amount)
  except ValueError:
    value = None
  if value is None or value <= 0 or (text.endswith('%') and value >= 100):
    raise DatasetError(
      f'dataset.minival={holdout!r} is not a number of examples > 0, a percentage in (0, 100) '
      "or a split (e.g. '10%', 5000 or 'validation[:200]')"
    )
  # The end of the split, in its fixed order: the same examples on every launch and process,
  # and never any of the eval split's.
  return f'{split}[:-{holdout}]', f'{split}[-{holdout}:]'


def check_disjoint(a: DataSplit, b: DataSplit, what: str) -> None:
  """Raises DatasetError when two splits of one dataset can share an example (their slices of
  one tfds split overlap), naming `what` and both split strings; silent where tfds records no
  split sizes (its mock data).

  Raises:
    DatasetError: in one line.
  """
  try:
    ranges = [_absolute(d) for d in (a, b)]
  except (ValueError, KeyError, TypeError):
    return
  for name, lo, hi in ranges[0]:
    for other, lo2, hi2 in ranges[1]:
      if name == other and max(lo, lo2) < min(hi, hi2):
        raise DatasetError(
          f'{what}: {b.spec!r} shares examples {max(lo, lo2)}..{min(hi, hi2) - 1} of '
          f'{name!r} with {a.spec!r}; choose slices that do not overlap'
        )


def _absolute(data: DataSplit) -> list[tuple[str, int, int]]:
  """`(tfds split, first, end)` of each part of the split's spec, ends open ends closed."""
  splits = data.builder.info.splits
  if not splits:
    raise ValueError('no split sizes recorded')
  parts = tfds.core.ReadInstruction.from_spec(data.spec).to_absolute(splits)
  return [
    (p.splitname, p.from_ or 0, splits[p.splitname].num_examples if p.to is None else p.to)
    for p in parts
  ]
