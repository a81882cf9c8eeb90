"""Forgetting: how fine-tuning moves the source model's own predictions.

When the loaded weights carry a classifier head of their own (ImageNet's 1,000 classes), the
run replaces it with the task's head, but the source head can still be put back on the current
backbone. On a fixed set of images, the fraction whose source-head prediction (top-1) is the
loaded model's is the *agreement*: 1.0 while the backbone is untouched (a linear probe), and
it falls as fine-tuning rewrites the features the source head reads. It measures drift of the
source function, as in studies of catastrophic forgetting under fine-tuning (e.g. Kumar et
al., ICLR 2022, "Fine-Tuning can Distort Pretrained Features"), without the source labels.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import lax

from ftlab import parallel, train
from ftlab.data import input_pipeline
from ftlab.data.datasets import DataSplit
from ftlab.errors import ConfigError
from ftlab.evals.base import Evaluator, Setting, StageView, register
from ftlab.files import checkpoint

PyTree = Any
HEAD = 'predictions'  # the layer that a task's head replaces


class ForgettingError(ConfigError):
  """The loaded weights have no head of their own to compare, or one the model cannot take."""


def load_source_head(directory: str, params: PyTree) -> dict:
  """The `predictions` layer of the checkpoint in `directory` (the run's initial weights).

  Args:
    directory: the init checkpoint's directory.
    params: the run's parameters (to check that the head reads the same features).

  Raises:
    ForgettingError: the checkpoint holds no head, or one whose input width is not the
      run's (another head type: the source head would need layers the model lacks).
  """
  shapes = checkpoint.stored_shapes(directory)
  kernel = shapes.get(f'{HEAD}/kernel')
  if kernel is None:
    raise ForgettingError(f'evals.forgetting: the loaded weights ({directory}) have no head')
  # The checkpoint's head can only be put back if it reads as many features as the run's
  # `predictions` does: the same head type and width; the class count may differ.
  width = params[HEAD]['kernel'].shape[0]
  if kernel[0] != width:
    raise ForgettingError(
      f'evals.forgetting: the loaded head reads {kernel[0]} features, this model gives {width} '
      "(use the loaded weights' own head type, e.g. model.head='imagenet')"
    )
  expected = {HEAD: {k: np.zeros(shapes[f'{HEAD}/{k}'], np.float32) for k in ('kernel', 'bias')}}
  # Everything but the head is left unread (a negative lookahead in `dont_load`): the
  # backbone comes from the state at each eval, not from the checkpoint.
  found = checkpoint.load_params(directory, expected, dont_load=(rf'(?!{HEAD}/).*',))
  return jax.tree.map(np.asarray, found[HEAD])


def _predict_step(state: Any, batch: dict, *, model: nn.Module, head: dict) -> dict:
  # The source head replaces the task's on the current backbone; the state is not changed.
  variables = train.model_variables({**state.params, HEAD: head}, state.batch_stats)
  logits = model.apply(variables, batch['image'], train=False)
  found = {'top1': jnp.argmax(logits, -1), 'mask': batch['mask']}
  return lax.all_gather(found, parallel.AXIS, tiled=True)


@dataclasses.dataclass
class Drift:
  """The source head's agreement with the loaded model on a fixed split, during training.

  Attributes:
    split: the images compared.
    head: the source `predictions` layer (`load_source_head`).
    order: the eval order (global batch, this process's place).
    image_size, preprocess: how images are prepared (the run's).
    reference: the loaded model's top-1 per image, set by `start`.
  """

  split: DataSplit
  head: dict
  order: input_pipeline.BatchOrder
  image_size: int
  preprocess: str
  reference: np.ndarray | None = None

  def compile(self, model: nn.Module, spread: parallel.Spread) -> Callable:
    """`p_predict(state, batch)`: the source head's top-1 on the state's backbone."""
    # The source task's class count (1,000 for ImageNet), not the run's.
    source = model.clone(num_classes=self.head['bias'].shape[0])
    step = functools.partial(_predict_step, model=source, head=self.head)
    return spread.compile(step, in_kinds=(parallel.REPLICATED, parallel.SHARDED))

  def predictions(self, p_predict: Callable, state: Any, spread: Any) -> np.ndarray:
    """The source head's top-1 class of every image, in split order: int `[n]`."""
    batches = input_pipeline.eval_iterator(
      self.split, self.order, image_size=self.image_size, preprocess=self.preprocess
    )
    order, n = self.order, self.split.num_examples
    rows = functools.partial(
      input_pipeline.gathered_positions, n, order.process_count, order.local_batch
    )
    return parallel.collect(p_predict, state, spread, batches, rows, n)['top1']

  def start(self, p_predict: Callable, loaded_state: Any, spread: Any) -> None:
    """Records the loaded model's predictions (its own weights and head)."""
    self.reference = self.predictions(p_predict, loaded_state, spread)

  # Agreement, not accuracy: it needs no source labels, and 1.0 means the source function is
  # intact whatever its own accuracy was.
  def agreement(self, p_predict: Callable, state: Any, spread: Any) -> dict[str, float]:
    """`{'agreement': fraction of images whose top-1 is the loaded model's}`."""
    return {
      'agreement': float(np.mean(self.predictions(p_predict, state, spread) == self.reference))
    }


@register
class Forgetting(Evaluator):
  """The source head's agreement at every eval (`config.evals.forgetting.split`; '' = off):
  metric `forgetting/agreement`, summary `final_source_agreement`."""

  name = 'forgetting'

  def __init__(self, drift: Drift, setting: Setting):
    self.drift, self.setting = drift, setting
    self._p_predict: Callable | None = None

  @classmethod
  def build(cls, setting: Setting) -> Forgetting | None:
    """The drift measure from its config (`split`), or None.

    Raises:
      ForgettingError: no loaded weights, or no head in them the model can take.
      DatasetError: a split the dataset lacks.
    """
    split = setting.config.get('split', '')
    if not split:
      return None
    if not setting.init_directory:
      raise ForgettingError('evals.forgetting: needs loaded weights (init.checkpoint) with a head')
    head = load_source_head(setting.init_directory, setting.variables['params'])
    data = setting.data
    order = data.order.with_batch(data.eval_batch)
    drift = Drift(setting.build_split(split), head, order, data.image_size, data.preprocess)
    return cls(drift, setting)

  def start_stage(self, stage: StageView) -> None:
    """Compiles the prediction step once (the whole model, from images, in every stage) and
    records the loaded model's predictions, before the first step."""
    del stage
    # Once for the run, not per stage: the step runs the whole model from images (never on a
    # cached prefix), and the reference is the loaded model's, which no stage changes.
    if self._p_predict is None:
      spread, variables = self.setting.spread, self.setting.variables
      self._p_predict = self.drift.compile(self.setting.model, spread)
      loaded = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
      # No optimizer state: the prediction step reads only the parameters and statistics.
      state = train.TrainState(0, loaded['params'], loaded['batch_stats'], ())
      self.drift.start(self._p_predict, spread.replicate(state), spread)

  def run(self, state: Any) -> dict[str, float]:
    found = self.drift.agreement(self._p_predict, state, self.setting.spread)
    logging.info('source head agreement %.4f', found['agreement'])
    return {'forgetting/agreement': found['agreement']}

  def summary(self, metrics: Mapping[str, float]) -> dict[str, Any]:
    return {'final_source_agreement': metrics['forgetting/agreement']}
