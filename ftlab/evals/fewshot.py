"""A closed-form few-shot linear probe: how linearly separable a representation is.

For a few labelled examples per class, features are centred on their mean and mapped to
targets +1 (the class) / -1 (the others) by ridge regression solved in closed form; test
examples take the class of the highest score. As big_vision's few-shot evaluator
(`big_vision/evaluators/fewshot.py`, from Kolesnikov et al., "Big Transfer", 2020), which
fits the same regression on pre-logit features to track a representation during training.
Fitting takes milliseconds for 25 shots of 100 classes, so it can run at every eval.

During training (`config.evals.fewshot`) the features are those of the current weights,
in inference mode, at the input of the `predictions` layer (`pre_logits`) or at a block's
output (average-pooled over space), so the probe shows how a plan changes the
representation, not only the head.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import lax

from ftlab import parallel, train
from ftlab.data import input_pipeline
from ftlab.data.datasets import DataSplit
from ftlab.errors import ConfigError
from ftlab.evals.base import Evaluator, Setting, StageView, register

PRE_LOGITS = 'pre_logits'

DEFAULT_L2_REG = 2.0**10  # big_vision's few-shot default


def first_shots(labels: np.ndarray, shots: int, num_classes: int) -> np.ndarray:
  """Positions of the first `shots` examples of each class in `labels` order, ascending.

  Raises:
    ValueError: a class has fewer than `shots` examples (names the class and its count).
  """
  labels = np.asarray(labels)
  chosen = []
  for c in range(num_classes):
    of_class = np.flatnonzero(labels == c)
    if len(of_class) < shots:
      raise ValueError(f'few-shot probe: class {c} has {len(of_class)} examples, not {shots}')
    # The first, not a random draw: the sets for smaller shot counts are nested in the larger
    # ones (the split itself is already a seeded draw of `max(shots)` per class).
    chosen.append(of_class[:shots])
  return np.sort(np.concatenate(chosen))


def ridge_weights(x: np.ndarray, targets: np.ndarray, l2_reg: float) -> np.ndarray:
  """`argmin_W ||x W - targets||^2 + l2_reg ||W||^2`, in float64.

  Solved in the smaller of the two closed forms: `(x^T x + l2 I)^-1 x^T t` (d x d) or, with
  fewer examples than features, `x^T (x x^T + l2 I)^-1 t` (n x n); the two are equal.

  Args:
    x: features `[n, d]`.
    targets: `[n, k]`.
    l2_reg: the ridge coefficient, > 0.

  Returns:
    `W`, float64 `[d, k]`.
  """
  if not l2_reg > 0:
    raise ValueError(f'few-shot probe: l2_reg {l2_reg} must be > 0')
  # float64: the normal equations square the features' scale and condition number, and the
  # solve is small enough that the precision costs nothing.
  x, targets = np.asarray(x, np.float64), np.asarray(targets, np.float64)
  n, d = x.shape
  # The dual (push-through) form: the same `W`, but an n x n solve, and few-shot sets have far
  # fewer examples than pre-logit features (a 4096-wide fc2).
  if n < d:
    return x.T @ np.linalg.solve(x @ x.T + l2_reg * np.eye(n), targets)
  return np.linalg.solve(x.T @ x + l2_reg * np.eye(d), x.T @ targets)


def probe_accuracy(
  train_x: np.ndarray,
  train_y: np.ndarray,
  test_x: np.ndarray,
  test_y: np.ndarray,
  num_classes: int,
  l2_reg: float = DEFAULT_L2_REG,
) -> float:
  """Test accuracy of the ridge probe fitted on `(train_x, train_y)`.

  Args:
    train_x, test_x: features `[n, d]` and `[m, d]` (flattened if they have more axes).
    train_y, test_y: int labels `[n]`, `[m]` in [0, num_classes).
    num_classes: the number of classes.
    l2_reg: the ridge coefficient.

  Returns:
    The fraction of test examples whose highest score is their class.
  """
  train_x = np.asarray(train_x, np.float64).reshape(len(train_y), -1)
  test_x = np.asarray(test_x, np.float64).reshape(len(test_y), -1)
  mean = train_x.mean(axis=0, keepdims=True)  # centring helps (big_vision)
  # +1 for the class and -1 for the others, as big_vision. Any affine encoding predicts the
  # same argmax: the ridge solution is linear in the targets, and a constant target column
  # adds the same score to every class.
  targets = 2.0 * np.eye(num_classes)[np.asarray(train_y)] - 1.0
  weights = ridge_weights(train_x - mean, targets, l2_reg)
  predicted = np.argmax((test_x - mean) @ weights, axis=1)
  return float(np.mean(predicted == np.asarray(test_y)))


def probe_accuracies(
  train_x: np.ndarray,
  train_y: np.ndarray,
  test_x: np.ndarray,
  test_y: np.ndarray,
  num_classes: int,
  shots: Sequence[int],
  l2_reg: float = DEFAULT_L2_REG,
) -> dict[int, float]:
  """`probe_accuracy` for each shot count, fitted on the first `k` examples of each class
  of the training features (so the smaller sets are nested in the larger ones)."""
  found = {}
  for k in shots:
    rows = first_shots(train_y, k, num_classes)
    found[k] = probe_accuracy(train_x[rows], train_y[rows], test_x, test_y, num_classes, l2_reg)
  return found


def feature_fn(model: nn.Module, layer: str) -> Callable[[Any, jnp.ndarray], jnp.ndarray]:
  """`fn(variables, images) -> features`, float32 `[b, d]`, of `model` in inference mode.

  Args:
    model: the unbound VGG (full, not a cached suffix).
    layer: `pre_logits` (what the `predictions` layer sees: the head's last hidden layer,
      or the pooled or flattened block-5 map where the head has none) or a block name
      (`block1`.. and `fc`): its output, average-pooled over space when it is a map.

  Raises:
    ConfigError: an unknown layer, or `pre_logits` of a model without a head.
  """
  names = model.block_names()
  if layer == PRE_LOGITS:
    if model.head == 'none':
      raise ConfigError("few-shot probe: layer 'pre_logits' needs a head; name a block instead")

    def pre_logits(variables, images):
      found = []

      # The input of `predictions` is caught on its way in, whatever head sits before it: no
      # second model definition that could drift from `vgg.VGG`.
      def grab(next_fun, args, kwargs, context):
        if context.module.name == 'predictions' and context.method_name == '__call__':
          found.append(args[0])
        return next_fun(*args, **kwargs)

      with nn.intercept_methods(grab):
        model.apply(variables, images, train=False)
      return found[0].astype(jnp.float32)

    return pre_logits
  if layer not in names[:-1]:
    raise ConfigError(f'few-shot probe: layer {layer!r} is not one of {[PRE_LOGITS, *names[:-1]]}')
  prefix = model.clone(stop_block=names[names.index(layer) + 1])

  def block_output(variables, images):
    x = prefix.apply(variables, images, train=False)
    # A block's map is pooled over space so the probe's width is its channel count, not
    # H x W x C: early blocks would otherwise give hundreds of thousands of features.
    return (x.mean(axis=(1, 2)) if x.ndim == 4 else x).astype(jnp.float32)

  return block_output


def runs_after(model: nn.Module, layer: str, start: str) -> bool:
  """Whether `layer`'s features can be computed by `model` from the output of the blocks
  before `start` (a cached prefix): `pre_logits`, or a block from `start` on."""
  names = model.block_names()
  return layer == PRE_LOGITS or names.index(layer) >= names.index(start)


def _feature_step(state: Any, batch: dict, *, features: Callable) -> dict:
  x = features(train.model_variables(state.params, state.batch_stats), batch['image'])
  # Gathered: every process sees every example's features and fits the same probe.
  found = {'x': x, 'label': batch['label'], 'mask': batch['mask']}
  return lax.all_gather(found, parallel.AXIS, tiled=True)


def compile_features(model: nn.Module, layer: str, spread: parallel.Spread) -> Callable:
  """`p_features(state, batch)`: `feature_fn`'s features of a sharded padded batch,
  gathered so every device holds the global batch's `{'x', 'label', 'mask'}`."""
  step = functools.partial(_feature_step, features=feature_fn(model, layer))
  return spread.compile(step, in_kinds=(parallel.REPLICATED, parallel.SHARDED))


@dataclasses.dataclass(frozen=True)
class Sets:
  """What the probe reads during training.

  Attributes:
    train: the few-shot training examples (at least `max(shots)` per class).
    test: the examples it is tested on.
    shots: the shot counts, examples per class.
    layer: `PRE_LOGITS` or a block name (`feature_fn`).
    l2_reg: the ridge coefficient.
    order: the eval order (global batch, this process's place).
    image_size, preprocess: how images are prepared (the run's).
  """

  train: DataSplit
  test: DataSplit
  shots: tuple[int, ...]
  layer: str
  l2_reg: float
  order: input_pipeline.BatchOrder
  image_size: int
  preprocess: str

  def features(self, p_features: Callable, state: Any, spread: Any, split: DataSplit, batches=None):
    """Features and labels of every example of `split`, in split order, from its images or
    from `batches` (its padded eval batches of cached prefix outputs)."""
    if batches is None:
      batches = input_pipeline.eval_iterator(
        split, self.order, image_size=self.image_size, preprocess=self.preprocess
      )
    order, n = self.order, split.num_examples
    rows = functools.partial(
      input_pipeline.gathered_positions, n, order.process_count, order.local_batch
    )
    # `collect` puts every gathered row back at its split position, so features and labels
    # line up with `first_shots`' positions whatever the process count.
    found = parallel.collect(p_features, state, spread, batches, rows, n)
    return found['x'], found['label']

  def evaluate(
    self, p_features: Callable, state: Any, spread: Any, cached: dict | None = None
  ) -> dict[str, float]:
    """`{'<k>shot_accuracy': accuracy}` of the probe on the current weights in `state`;
    `cached`: `{'fewshot_train', 'fewshot_test': () -> batches}` of prefix outputs
    (`activation_cache.Prepared.extra_batches`), for a `p_features` of the rest."""
    train, test = (cached['fewshot_train'](), cached['fewshot_test']()) if cached else (None, None)
    train_x, train_y = self.features(p_features, state, spread, self.train, train)
    test_x, test_y = self.features(p_features, state, spread, self.test, test)
    found = probe_accuracies(
      train_x, train_y, test_x, test_y, self.train.num_classes, self.shots, self.l2_reg
    )
    return {f'{k}shot_accuracy': v for k, v in found.items()}


@register
class FewShot(Evaluator):
  """The few-shot probe at every eval (`config.evals.fewshot`; off while `shots` is empty):
  metrics `fewshot/<k>shot_accuracy`, summary `final_fewshot`."""

  name = 'fewshot'

  def __init__(self, sets: Sets, model: nn.Module, spread: Any):
    self.sets, self.model, self.spread = sets, model, spread
    self._p_features: Callable | None = None
    self._cached: dict | None = None

  @classmethod
  def build(cls, setting: Setting) -> FewShot | None:
    """The probe's sets from its config (`shots`, `layer`, `train_split`, `test_split`,
    `l2_reg`), or None when `shots` is empty. The training split is drawn with `max(shots)`
    examples per class (`dataset.examples_per_class`'s seeded draw); the test split is the
    run's eval split unless named.

    Raises:
      ConfigError: shots that are not positive integers, or an unknown layer.
      DatasetError: a split the dataset lacks, or a class with fewer examples than the shots.
    """
    cfg, data = setting.config, setting.data
    shots = tuple(cfg.get('shots', ()) or ())
    if not shots:
      return None
    if not all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in shots):
      raise ConfigError(f'evals.fewshot.shots={shots}: need positive integers, e.g. (1, 5, 10)')
    layer = cfg.get('layer', PRE_LOGITS)
    # At build time, so a bad layer is an error at launch rather than at the first eval.
    feature_fn(setting.model, layer)  # checks the layer
    train_split = cfg.get('train_split', '') or setting.split_names['train']
    # Drawn with `max(shots)` per class so every shot count finds its examples in it.
    train = setting.build_split(train_split, max(shots), 'evals.fewshot.shots')
    test = setting.build_split(cfg.get('test_split', '') or setting.split_names['eval'])
    order = data.order.with_batch(data.eval_batch)
    l2_reg = float(cfg.get('l2_reg', DEFAULT_L2_REG))
    sets = Sets(train, test, shots, layer, l2_reg, order, data.image_size, data.preprocess)
    return cls(sets, setting.model, setting.spread)

  def splits(self) -> dict[str, DataSplit]:
    return {'fewshot_train': self.sets.train, 'fewshot_test': self.sets.test}

  def start_stage(self, stage: StageView) -> None:
    # From the cached prefix outputs when the probe's layer comes after the cached blocks.
    # A layer inside the cached prefix cannot be computed from its outputs: the probe then runs
    # the whole model on images, while the training runs cached.
    on_cache = bool(stage.start) and runs_after(self.model, self.sets.layer, stage.start)
    model = stage.model if on_cache else self.model
    self._p_features = compile_features(model, self.sets.layer, self.spread)
    self._cached = dict(stage.extra_batches) if on_cache else None

  def run(self, state: Any) -> dict[str, float]:
    found = self.sets.evaluate(self._p_features, state, self.spread, self._cached)
    logging.info('few-shot probe (%s) %s', self.sets.layer, found)
    return {f'fewshot/{k}': v for k, v in found.items()}

  def summary(self, metrics: Mapping[str, float]) -> dict[str, Any]:
    prefix = 'fewshot/'
    return {
      'final_fewshot': {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}
    }
