"""What a run's label is: the dataset's class label, another class feature of it, or a label
computed from an example's annotations (VTAB's structured tasks).

`dataset.label` names it:

  ''                the dataset's supervised label (`supervised_keys`, else `label`)
  'key:FEATURE'     another class feature, e.g. smallNORB's `label_azimuth` (18 classes)
  'bins:FEATURE:N'  a class feature of K classes cut into N equal bins, `v * N // K`:
                    dSprites' `label_x_position` (32 values) or `label_orientation` (40) as
                    16 classes, as VTAB does
  'clevr_count'     CLEVR's number of objects, 3..10, as classes 0..7 (VTAB `count_all`)
  'clevr_distance'  CLEVR's closest object's depth (`objects/pixel_coords[:, 2]`) in 6 bins,
                    edges 8, 8.5, 9, 9.5, 10 (VTAB `closest_object_distance`)
  'kitti_distance'  KITTI's closest car, van or truck (`objects/location[:, 2]`, metres) in 4
                    classes: up to 8 m, up to 20 m, farther, none (VTAB
                    `closest_vehicle_distance`)

The VTAB definitions follow google-research/task_adaptation (`task_adaptation/data/clevr.py`,
`kitti.py`, `dsprites.py`; Zhai et al. 2019, "A Large-scale Study of Representation Learning
with the Visual Task Adaptation Benchmark", arXiv:1910.04867).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import tensorflow as tf
import tensorflow_datasets as tfds

from ftlab.errors import InputError


class LabelError(InputError):
  """A `dataset.label` that names no label of the dataset."""


FORMS = "'', 'key:FEATURE', 'bins:FEATURE:N', 'clevr_count', 'clevr_distance', 'kitti_distance'"

# Bin edges (task_adaptation): a value's class is the number of edges below it, less one.
CLEVR_DISTANCE_EDGES = (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0)
KITTI_DISTANCE_EDGES = (-100.0, 8.0, 20.0, 999.0)
KITTI_VEHICLES = ('Car', 'Van', 'Truck')  # KITTI's object types that count as vehicles
KITTI_NO_VEHICLE = 1000.0  # the distance of an image without vehicles: the last class


@dataclasses.dataclass(frozen=True)
class Label:
  """A dataset's label for a run.

  Attributes:
    spec: the `dataset.label` string it was made from ('' for the supervised label).
    names: the class names, in label order.
    of: example (a dict of the record's decoded features) -> int64 scalar tensor.
  """

  spec: str
  names: tuple[str, ...]
  of: Callable[[dict], tf.Tensor]


def resolve(spec: str, builder: tfds.core.DatasetBuilder) -> Label:
  """The `Label` that `spec` names on `builder`'s dataset (forms: the module docstring).

  Raises:
    LabelError: an unknown form, a feature the dataset lacks or that is no class feature,
      a bin count outside [1, K]; one line naming the value and what would be valid.
  """
  spec = str(spec or '').strip()
  features = builder.info.features
  if not spec:
    key = tuple(builder.info.supervised_keys or ('image', 'label'))[1]
    if key not in features:  # CLEVR, KITTI, dSprites: the task chooses its label
      raise LabelError(
        f'{builder.name} has no class label of its own; choose one with dataset.label '
        f'(valid: {FORMS}; features: {", ".join(features)})'
      )
    return Label('', tuple(_class_feature(features, key, builder).names), lambda ex: ex[key])
  kind, _, rest = spec.partition(':')
  if kind == 'key' and rest:
    names = tuple(_class_feature(features, rest, builder).names)
    return Label(spec, names, lambda ex: ex[rest])
  if kind == 'bins' and rest.count(':') == 1:
    key, count = rest.split(':')
    k = _class_feature(features, key, builder).num_classes
    n = _whole(count, spec, k)
    if not 1 <= n <= k:
      raise LabelError(f'dataset.label={spec!r}: {n} bins of {key}, valid: 1 to {k}')
    # Integer arithmetic: the bins of v * n // k hold k/n values each, as task_adaptation's
    # floor(v / (k / n)), without float rounding at the edges.
    names = tuple(f'{key} {_values(i, n, k)}' for i in range(n))
    return Label(spec, names, lambda ex: tf.cast(ex[key], tf.int64) * n // k)
  if spec == 'clevr_count':
    _need(features, 'objects', spec, builder)
    # 3 to 10 objects per CLEVR image: count - 3 is the class.
    names = tuple(str(c) for c in range(3, 11))
    return Label(spec, names, lambda ex: tf.cast(tf.shape(ex['objects']['size'])[0], tf.int64) - 3)
  if spec == 'clevr_distance':
    _need(features, 'objects', spec, builder)
    edges = CLEVR_DISTANCE_EDGES

    def closest(ex):
      return tf.reduce_min(ex['objects']['pixel_coords'][:, 2])

    return Label(spec, _bin_names(edges), lambda ex: bin_index(closest(ex), edges))
  if spec == 'kitti_distance':
    _need(features, 'objects', spec, builder)
    types = features['objects']['type']
    vehicles = tf.constant([types.str2int(t) for t in KITTI_VEHICLES], tf.int64)
    edges = KITTI_DISTANCE_EDGES

    def closest(ex):
      objects = ex['objects']
      is_vehicle = tf.reduce_any(tf.cast(objects['type'], tf.int64)[:, None] == vehicles, -1)
      depth = tf.where(is_vehicle, objects['location'][:, 2], KITTI_NO_VEHICLE)
      # An image without objects has no depth to take the minimum of: no vehicle.
      return tf.reduce_min(tf.concat([depth, [KITTI_NO_VEHICLE]], 0))

    names = (*_bin_names(edges), 'no vehicle')  # past the last edge: the 1000 m of none
    return Label(spec, names, lambda ex: bin_index(closest(ex), edges))
  raise LabelError(f'dataset.label={spec!r} is not a label; valid: {FORMS}')


def bin_index(value: tf.Tensor, edges: tuple[float, ...]) -> tf.Tensor:
  """The class of `value` among bins with these edges: how many edges lie strictly below it,
  less one (task_adaptation's `reduce_max(where(edges - value < 0))`). int64 scalar."""
  below = tf.cast(tf.constant(edges, tf.float32) < tf.cast(value, tf.float32), tf.int64)
  return tf.reduce_sum(below) - 1


def _bin_names(edges: tuple[float, ...]) -> tuple[str, ...]:
  return tuple(f'({lo:g}, {hi:g}]' for lo, hi in zip(edges[:-1], edges[1:]))


def _values(i: int, n: int, k: int) -> str:
  """The original values that fall in bin i of n over k classes."""
  inside = [v for v in range(k) if v * n // k == i]
  return f'{inside[0]}-{inside[-1]}' if len(inside) > 1 else str(inside[0])


def _whole(text: str, spec: str, most: int) -> int:
  try:
    return int(text)
  except ValueError:
    raise LabelError(
      f'dataset.label={spec!r}: {text!r} is not a whole number of bins (valid: 1 to {most})'
    ) from None


def _need(features, key: str, spec: str, builder) -> None:
  if key not in features:
    raise LabelError(
      f'dataset.label={spec!r} reads {key!r}, which {builder.name} lacks '
      f'(features: {", ".join(features)})'
    )


def _class_feature(features, key: str, builder) -> tfds.features.ClassLabel:
  _need(features, key, f'key:{key}', builder)
  feature = features[key]
  if not isinstance(feature, tfds.features.ClassLabel):
    classes = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
    raise LabelError(
      f'dataset.label: {builder.name} feature {key!r} is no class label '
      f'({type(feature).__name__}); class features: {", ".join(classes) or "none"}'
    )
  return feature
