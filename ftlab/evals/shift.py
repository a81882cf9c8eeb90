"""Shifted test sets: the same model on corrupted copies of the eval split.

LP-FT (Kumar et al., ICLR 2022) and WiSE-FT (Wortsman et al., CVPR 2022) claim their gains
out of distribution; this evaluator gives a run a distribution shift to check them on, in
the style of ImageNet-C (Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to
Common Corruptions and Perturbations", ICLR 2019): at every eval, the eval split's images are
corrupted by each named corruption at each severity and classified by the current weights.

Corruptions (of RGB pixels in [0, 1], at the model's input size, each as in the paper's code,
`hendrycks/robustness`, `ImageNet-C/create_c/make_imagenet_c.py`):

  gaussian_noise  clip(x + c * N(0, 1)), independent per pixel and channel; c a std in [0, 1]
                  units. The noise of an example is drawn from a seed made of the severity and
                  the example's record index in its split, never from the batch or the device.
  gaussian_blur   a Gaussian filter of std c pixels over height and width, edges extended
                  (`skimage.filters.gaussian`'s defaults: mode 'nearest', truncated at 4 std).
  contrast        (x - m) * c + m, m the image's mean per channel, clipped to [0, 1].
  jpeg            rounded to 8 bits, encoded as JPEG at quality c and decoded, by TensorFlow's
                  libjpeg (`tf.io.encode_jpeg`, 4:2:0 chroma; accurate integer DCT): the same
                  pixels as ImageNet-C's PIL round trip (tested bit for bit).
  pixelate        box-filter resize to int(c * side) pixels and back (PIL's `Image.BOX`, whose
                  coefficients `box_matrix` reproduces, as linear maps on float pixels).

Severity constants (1..5), from the two tables the paper's code holds:

  imagenet_c  (224 px)  noise .08 .12 .18 .26 .38 | blur 1 2 3 4 6 | contrast .4 .3 .2 .1 .05
                        | jpeg 25 18 15 10 7 | pixelate .6 .5 .4 .3 .25
  cifar10_c   (32 px)   noise .04 .06 .08 .09 .10 | blur .4 .6 .7 .8 1 | contrast .75 .5 .4 .3
                        .15 | jpeg 80 65 58 50 40 | pixelate .95 .9 .85 .75 .65
                        (`make_cifar_c.py`: the authors' own table for small images)

`table='auto'` takes `cifar10_c` for inputs up to 64 px (Fashion-MNIST, CIFAR) and `imagenet_c`
above. The one constant with a unit of pixels, the blur's std, is scaled by the input side over
the table's (224 or 32), so a table keeps its look at any input size; the others are relative
(noise std and contrast on [0, 1], JPEG quality, the pixelate side as a fraction).

Where: the split is read with the `unit` convention (RGB in [0, 1], after the run's
antialiased resize to the input size, as ImageNet-C corrupts the 224 px crops it evaluates),
each batch is corrupted on the host, then normalised with the run's convention
(`data.preprocessing.normalize`) and classified by the eval step. Reading once per eval and
corrupting every batch in turn costs one decode of the split plus one classification pass per
(corruption, severity) and one for the clean images. Unlike ImageNet-C's files, the corrupted
images are not rounded to 8 bits (except by JPEG itself). The host work per corruption is
about 0.05 ms per 32 px image and 2 ms per 224 px image (measured on a busy 2-core CPU); the
eval steps are dispatched without waiting, so it overlaps the device's work, and on a large
split with a fast accelerator `max_examples` bounds it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
from absl import logging

from ftlab import parallel, train
from ftlab.data import input_pipeline, preprocessing
from ftlab.data.datasets import DataSplit
from ftlab.errors import ConfigError
from ftlab.evals.base import Evaluator, Setting, StageView, register

CORRUPTIONS = ('gaussian_noise', 'gaussian_blur', 'contrast', 'jpeg', 'pixelate')
SEVERITIES = (1, 2, 3, 4, 5)
DEFAULT_SEVERITIES = (1, 3, 5)


@dataclasses.dataclass(frozen=True)
class Table:
  """One severity table: per corruption, its constant at severities 1..5.

  Attributes:
    side: the input side, pixels, the table was made for (the blur's std scales with it).
    constants: `{corruption: (c1, ..., c5)}` (units in the module docstring).
  """

  side: int
  constants: Mapping[str, tuple[float, ...]]


TABLES = {
  # hendrycks/robustness, ImageNet-C/create_c/make_imagenet_c.py (224 px center crops).
  'imagenet_c': Table(
    224,
    {
      'gaussian_noise': (0.08, 0.12, 0.18, 0.26, 0.38),
      'gaussian_blur': (1, 2, 3, 4, 6),
      'contrast': (0.4, 0.3, 0.2, 0.1, 0.05),
      'jpeg': (25, 18, 15, 10, 7),
      'pixelate': (0.6, 0.5, 0.4, 0.3, 0.25),
    },
  ),
  # hendrycks/robustness, ImageNet-C/create_c/make_cifar_c.py (CIFAR-10-C, 32 px): milder,
  # since at 32 px ImageNet-C's JPEG qualities and pixelation leave little of an image.
  'cifar10_c': Table(
    32,
    {
      'gaussian_noise': (0.04, 0.06, 0.08, 0.09, 0.10),
      'gaussian_blur': (0.4, 0.6, 0.7, 0.8, 1.0),
      'contrast': (0.75, 0.5, 0.4, 0.3, 0.15),
      'jpeg': (80, 65, 58, 50, 40),
      'pixelate': (0.95, 0.9, 0.85, 0.75, 0.65),
    },
  ),
}
SMALL_SIDE = 64  # 'auto': cifar10_c up to this input side, imagenet_c above
TABLE_NAMES = ('auto', *TABLES)

# The first word of every noise seed: a fixed stream, so the shifted set is the same in every
# run, seed and process (a benchmark, as ImageNet-C's files are), whatever `config.seed` is.
_NOISE_STREAM = 2019


def table_for(name: str, side: int) -> str:
  """The table `name` means at input side `side`: itself, or for `auto` by the side."""
  if name == 'auto':
    return 'cifar10_c' if side <= SMALL_SIDE else 'imagenet_c'
  return name


def constant(corruption: str, severity: int, side: int, table: str = 'auto') -> float:
  """The corruption's constant at `severity` for inputs of `side` pixels: the table's, with
  the blur's std (pixels) scaled by `side` over the table's side."""
  chosen = TABLES[table_for(table, side)]
  value = chosen.constants[corruption][severity - 1]
  if corruption == 'gaussian_blur':
    return value * side / chosen.side
  return value


def gaussian_noise(images: np.ndarray, std: float, severity: int, examples: np.ndarray):
  """`clip(x + std * z)`, z standard normal drawn per example from (severity, record index).

  Args:
    images: float32 `[b, h, w, c]` in [0, 1].
    std: the noise's standard deviation on that scale.
    severity: mixed into the seed, so severities draw independent noise.
    examples: int `[b]` record indices in the split; -1 marks padding (left as it is).

  Returns:
    float32 `[b, h, w, c]` in [0, 1].
  """
  out = np.array(images, np.float32)
  for row, example in enumerate(np.asarray(examples)):
    if example < 0:
      continue
    # One generator per example, seeded by what the example is, so its noise does not depend
    # on its batch, its row in it, the process or the device count.
    rng = np.random.default_rng([_NOISE_STREAM, int(severity), int(example)])
    noise = rng.standard_normal(out.shape[1:], dtype=np.float32)
    out[row] += np.float32(std) * noise
  return np.clip(out, 0.0, 1.0)


def gaussian_matrix(n: int, sigma: float, truncate: float = 4.0) -> np.ndarray:
  """The `[n, n]` linear map of a 1-D Gaussian filter with edges extended (mode 'nearest'),
  its kernel cut at `truncate` std as `scipy.ndimage.gaussian_filter1d` cuts it."""
  if sigma <= 0:
    return np.eye(n)
  radius = int(truncate * sigma + 0.5)
  taps = np.arange(-radius, radius + 1)
  weights = np.exp(-0.5 * (taps / sigma) ** 2)
  weights /= weights.sum()
  rows = np.broadcast_to(np.arange(n)[:, None], (n, len(taps)))
  # Past an edge the edge pixel repeats: its column gathers the weights of the taps beyond.
  cols = np.clip(rows + taps[None, :], 0, n - 1)
  matrix = np.zeros((n, n))
  np.add.at(matrix, (rows, cols), np.broadcast_to(weights, rows.shape))
  return matrix


def box_matrix(n_in: int, n_out: int) -> np.ndarray:
  """The `[n_out, n_in]` linear map of PIL's `Image.BOX` resize along one axis.

  Pillow's resampling coefficients (`precompute_coeffs` in `libImaging/Resample.c`): output
  pixel i is centred at (i + 0.5) * scale in the input (scale = n_in / n_out) and averages
  the input pixels whose centres lie within half a scale of it (half a pixel when enlarging),
  with equal weights.
  """
  scale = n_in / n_out
  filterscale = max(scale, 1.0)
  support = 0.5 * filterscale
  matrix = np.zeros((n_out, n_in))
  for i in range(n_out):
    center = (i + 0.5) * scale
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), n_in)
    x = (np.arange(lo, hi) - center + 0.5) / filterscale
    weights = ((x > -0.5) & (x <= 0.5)).astype(np.float64)
    if weights.sum() > 0:
      matrix[i, lo:hi] = weights / weights.sum()
  return matrix


def _separable(images: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
  """`rows @ image @ cols^T` per image and channel: `[b, h, w, c]` -> `[b, h', w', c]`."""
  x = np.einsum('ij,bjwc->biwc', rows.astype(np.float32), images, optimize=True)
  return np.einsum('kw,biwc->bikc', cols.astype(np.float32), x, optimize=True)


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
  """A Gaussian blur of std `sigma` pixels over height and width, edges extended.

  Args:
    images: float32 `[b, h, w, c]` in [0, 1].
    sigma: pixels.

  Returns:
    float32 `[b, h, w, c]` in [0, 1].
  """
  _, h, w, _ = images.shape
  blurred = _separable(images, gaussian_matrix(h, sigma), gaussian_matrix(w, sigma))
  return np.clip(blurred, 0.0, 1.0)


def contrast(images: np.ndarray, factor: float) -> np.ndarray:
  """`(x - m) * factor + m`, m each image's mean per channel, clipped: float32 `[b, h, w, c]`."""
  means = images.mean(axis=(1, 2), keepdims=True)
  return np.clip((images - means) * np.float32(factor) + means, 0.0, 1.0).astype(np.float32)


@functools.cache
def _jpeg_round_trip(quality: int) -> Callable:
  # Traced once per quality (an attribute of the encode op, not a tensor) for batches of any
  # size; one graph call per batch instead of two eager ops per image.
  @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
  def round_trip(images):
    return tf.map_fn(
      # The accurate integer DCT, as PIL decodes (TensorFlow's default is the fast one, which
      # rounds differently): with it the round trip is PIL's bit for bit.
      lambda image: tf.io.decode_jpeg(
        tf.io.encode_jpeg(image, quality=quality), channels=3, dct_method='INTEGER_ACCURATE'
      ),
      images,
      fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8),
    )

  return round_trip


def jpeg(images: np.ndarray, quality: int) -> np.ndarray:
  """Each image rounded to 8 bits, JPEG-encoded at `quality` (1-100) and decoded.

  Args:
    images: float32 `[b, h, w, 3]` in [0, 1].
    quality: the JPEG quality.

  Returns:
    float32 `[b, h, w, 3]`, multiples of 1/255.
  """
  pixels = np.round(np.clip(images, 0.0, 1.0) * 255).astype(np.uint8)
  decoded = _jpeg_round_trip(int(quality))(tf.constant(pixels)).numpy()
  return decoded.astype(np.float32) / np.float32(255)


def pixelate(images: np.ndarray, factor: float) -> np.ndarray:
  """Box-filter resize to `int(factor * side)` pixels and back (PIL's `Image.BOX` twice).

  Args:
    images: float32 `[b, h, w, c]` in [0, 1].
    factor: the small side as a fraction of the side, in (0, 1].

  Returns:
    float32 `[b, h, w, c]` in [0, 1].
  """
  _, h, w, _ = images.shape
  small_h, small_w = max(int(h * factor), 1), max(int(w * factor), 1)
  rows = box_matrix(small_h, h) @ box_matrix(h, small_h)
  cols = box_matrix(small_w, w) @ box_matrix(w, small_w)
  return _separable(images, rows, cols)


def corrupt(
  images: np.ndarray,
  corruption: str,
  severity: int,
  examples: np.ndarray,
  table: str = 'auto',
) -> np.ndarray:
  """`images` under `corruption` at `severity` (the table's constant for their side).

  Args:
    images: float32 `[b, h, w, 3]`, RGB in [0, 1].
    corruption: one of `CORRUPTIONS`.
    severity: 1..5.
    examples: int `[b]`, each row's record index in its split (-1: padding); seeds the noise.
    table: `auto`, `imagenet_c` or `cifar10_c`.

  Returns:
    float32 `[b, h, w, 3]` in [0, 1].

  Raises:
    KeyError: an unknown corruption or table (`Shift.build` checks configs first).
  """
  images = np.asarray(images, np.float32)
  c = constant(corruption, severity, images.shape[1], table)
  if corruption == 'gaussian_noise':
    return gaussian_noise(images, c, severity, examples)
  if corruption == 'gaussian_blur':
    return gaussian_blur(images, c)
  if corruption == 'contrast':
    return contrast(images, c)
  if corruption == 'jpeg':
    return jpeg(images, c)
  if corruption == 'pixelate':
    return pixelate(images, c)
  raise KeyError(corruption)


@dataclasses.dataclass(frozen=True)
class ShiftedSets:
  """The corrupted copies of one split that the evaluator classifies.

  Attributes:
    split: the clean examples.
    corruptions: names from `CORRUPTIONS`, in metric order.
    severities: from `SEVERITIES`.
    table: `auto`, `imagenet_c` or `cifar10_c`.
    order: the eval order (global batch, this process's place).
    image_size, preprocess: how images are prepared (the run's).
  """

  split: DataSplit
  corruptions: tuple[str, ...]
  severities: tuple[int, ...]
  table: str
  order: input_pipeline.BatchOrder
  image_size: int
  preprocess: str

  def cells(self) -> list[tuple[str, int]]:
    """`(corruption, severity)` pairs, with `('clean', 0)` first."""
    return [('clean', 0)] + [(c, s) for c in self.corruptions for s in self.severities]

  def batches(self) -> Iterator[tuple[dict, np.ndarray]]:
    """This process's padded eval batches in [0, 1] (`unit`), each with its rows' record
    indices (-1 for padding)."""
    order, n = self.order, self.split.num_examples
    share = input_pipeline.eval_share(n, order)
    batches = input_pipeline.eval_iterator(
      self.split, order, image_size=self.image_size, preprocess='unit'
    )
    for step, batch in enumerate(batches):
      rows = step * order.local_batch + np.arange(order.local_batch)
      real = rows < len(share)
      examples = np.full(order.local_batch, -1, np.int64)
      # The record index, not the row's place in the (sub)split: an example keeps its noise
      # when `max_examples` or the process count changes which rows it lands in.
      examples[real] = self.split.indices[share[rows[real]]]
      yield batch, examples

  def evaluate(self, p_eval_step: Callable, state: Any, spread: Any) -> dict[str, float]:
    """`{'clean_accuracy', '<corruption>_<severity>/accuracy', 'mean_accuracy'}` of the
    weights in `state` (mean: over every corrupted cell, so each corruption weighs alike)."""
    totals: dict[tuple[str, int], Any] = {}
    for batch, examples in self.batches():
      for cell in self.cells():
        corruption, severity = cell
        pixels = batch['image']
        if corruption != 'clean':
          pixels = corrupt(pixels, corruption, severity, examples, self.table)
        # Back on the 0-255 scale the conventions start from, then the run's normalisation.
        images = preprocessing.normalize(pixels * np.float32(255), self.preprocess)
        batch_of_cell = spread.shard({**batch, 'image': images.astype(np.float32)})
        sums = parallel.in_dispatch_order(p_eval_step(state, batch_of_cell))
        # The sums stay on the devices until the one `device_get` below.
        totals[cell] = sums if cell not in totals else jax.tree.map(jnp.add, totals[cell], sums)
    host = jax.device_get({k: spread.unreplicate(v) for k, v in totals.items()})
    found = {'clean_accuracy': train.eval_metrics(host[('clean', 0)])['accuracy']}
    for (corruption, severity), sums in host.items():
      if corruption != 'clean':
        found[f'{corruption}_{severity}/accuracy'] = train.eval_metrics(sums)['accuracy']
    shifted = [v for k, v in found.items() if k != 'clean_accuracy']
    found['mean_accuracy'] = float(np.mean(shifted))
    return found


def evenly_spaced(split: DataSplit, count: int) -> DataSplit:
  """`count` examples of `split` spread evenly over it (all of them if `count` is 0 or at
  least its size), keeping their record indices (the noise's seeds)."""
  if not 0 < count < split.num_examples:
    return split
  # Evenly spaced rather than the first k: a split stored class by class (image folders)
  # keeps its classes.
  chosen = np.arange(count) * split.num_examples // count
  labels = None if split.labels is None else split.labels[chosen]
  return dataclasses.replace(split, indices=split.indices[chosen], labels=labels)


def _names(value: Any, field: str, valid: Sequence) -> tuple:
  """`value` as a tuple of distinct entries of `valid`, in order; one line if it is not."""
  # A bare value (`table='auto'`, `severities=5`) is a one-entry list; anything but a list or
  # tuple is one value, checked like the others, so a wrong type is a one-line error too.
  values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
  for v in values:
    # bool is an int and 1.0 == 1: `severities=(True,)` or `(1.0,)` is a mistake, not severity 1
    # (and would name its metrics `..._1.0`).
    if isinstance(v, bool) or not isinstance(v, type(valid[0])) or v not in valid:
      raise ConfigError(
        f'evals.shift.{field}: {v!r} is not one of {", ".join(str(x) for x in valid)}'
      )
  return tuple(dict.fromkeys(values))


@register
class Shift(Evaluator):
  """The eval split under ImageNet-C-style corruptions at every eval (`config.evals.shift`;
  off unless `enabled`): metrics `shift/<corruption>_<severity>/accuracy`,
  `shift/clean_accuracy`, `shift/mean_accuracy`; summary `final_shift`."""

  name = 'shift'

  def __init__(self, sets: ShiftedSets, model: nn.Module, spread: Any):
    self.sets, self.model, self.spread = sets, model, spread
    self._p_eval_step: Callable | None = None

  @classmethod
  def build(cls, setting: Setting) -> Shift | None:
    """The shifted sets from the config (`enabled`, `corruptions`, `severities`, `table`,
    `max_examples`, `split`), or None when not enabled. Every field is checked here, before
    any data is read or step compiled.

    Raises:
      ConfigError: an unknown corruption, severity or table, or a negative `max_examples`.
      DatasetError: a named split the dataset lacks.
    """
    cfg, data = setting.config, setting.data
    if not cfg.get('enabled', False):
      return None
    corruptions = _names(cfg.get('corruptions', ()) or CORRUPTIONS, 'corruptions', CORRUPTIONS)
    severities = cfg.get('severities', DEFAULT_SEVERITIES)
    severities = _names(severities or DEFAULT_SEVERITIES, 'severities', SEVERITIES)
    table = _names(cfg.get('table', 'auto'), 'table', TABLE_NAMES)[0]
    max_examples = cfg.get('max_examples', 0)
    if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 0:
      raise ConfigError(f'evals.shift.max_examples={max_examples!r}: need an integer >= 0')
    name = cfg.get('split', '')
    # By default the very examples the classification evaluator scores, so `shift/clean_accuracy`
    # is `eval/accuracy` and the corrupted numbers compare with it.
    split = setting.build_split(name) if name else data.evals['eval']
    split = evenly_spaced(split, max_examples)
    order = data.order.with_batch(data.eval_batch)
    sets = ShiftedSets(
      split, corruptions, severities, table, order, data.image_size, data.preprocess
    )
    return cls(sets, setting.model, setting.spread)

  def start_stage(self, stage: StageView) -> None:
    # The whole model, from images, in every stage: corruptions need pixels, so a stage that
    # trains on cached prefix outputs is still evaluated from the images. Recompiled per stage
    # because the plan says which BatchNorm layers run on their running statistics.
    self._p_eval_step = train.compile_eval_step(self.spread, self.model, stage.plan)

  def run(self, state: Any) -> dict[str, float]:
    found = self.sets.evaluate(self._p_eval_step, state, self.spread)
    logging.info(
      'shifted eval: clean %.4f, mean over %d corrupted sets %.4f',
      found['clean_accuracy'],
      len(found) - 2,
      found['mean_accuracy'],
    )
    return {f'shift/{k}': v for k, v in found.items()}

  def summary(self, metrics: Mapping[str, float]) -> dict[str, Any]:
    prefix = 'shift/'
    return {
      'final_shift': {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}
    }
