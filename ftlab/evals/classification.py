"""Loss and accuracy on the run's evaluated splits, of the weights and of their moving average.

Every split the data holds (`eval`, `minival` when one is held out, and the named splits of
`dataset.eval_splits`) is evaluated exactly: padded, masked batches spread over the devices,
sums added over them (`ftlab.train.evaluate`), so every example counts once on any number of
devices and hosts. When the train state keeps a moving average of the weights
(`config.ema_decay`), the averaged model is evaluated on the same splits beside the raw one
(`<split>/ema_accuracy`, `<split>/ema_loss`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from absl import logging

from ftlab import ema, train
from ftlab.evals.base import Evaluator, Setting, StageView, register


@register
class Classification(Evaluator):
  name = 'classification'

  def __init__(self, spread: Any, with_ema: bool):
    self.spread, self.with_ema = spread, with_ema
    self._p_eval_step: Callable | None = None
    self._p_averaged: Callable | None = None
    self._sources: Mapping[str, Callable] = {}

  @classmethod
  def build(cls, setting: Setting) -> Classification:
    return cls(setting.spread, setting.ema)

  def start_stage(self, stage: StageView) -> None:
    # Recompiled per stage: the bound model changes with the plan (which BatchNorm layers are
    # frozen), and a cached stage's model starts after the prefix.
    self._p_eval_step = train.compile_eval_step(self.spread, stage.model, stage.plan)
    self._sources = stage.eval_batches
    if self.with_ema:
      self._p_averaged = ema.compile_averaged_state(self.spread, stage.plan)

  def run(self, state: Any) -> dict[str, float]:
    found = {}
    for name, batches in self._sources.items():
      metrics = train.evaluate(self._p_eval_step, state, self.spread, batches())
      found.update({f'{name}/{k}': v for k, v in metrics.items()})
      logging.info('%s accuracy %.4f on %d examples', name, metrics['accuracy'], metrics['count'])
    if self._p_averaged is not None:  # the averaged weights on the same splits
      # A new replicated state with the EMA swapped in; the training state itself is not touched,
      # and the averaged model keeps the raw model's BatchNorm running statistics.
      averaged = self._p_averaged(state)
      for name, batches in self._sources.items():
        metrics = train.evaluate(self._p_eval_step, averaged, self.spread, batches())
        found.update(
          {f'{name}/ema_accuracy': metrics['accuracy'], f'{name}/ema_loss': metrics['loss']}
        )
        logging.info('%s EMA accuracy %.4f', name, metrics['accuracy'])
    return found

  def summary(self, metrics: Mapping[str, float]) -> dict[str, Any]:
    # The classification evaluator is always built, so these keys always exist; the loop also
    # relies on `<held_out>/accuracy` to pick the best step.
    found = {
      'final_eval_accuracy': metrics['eval/accuracy'],
      'final_eval_loss': metrics['eval/loss'],
      'eval_examples': int(metrics['eval/count']),
    }
    if 'minival/accuracy' in metrics:
      found['final_minival_accuracy'] = metrics['minival/accuracy']
    # Every evaluated split by name (`eval`, `minival`, `dataset.eval_splits`), for tables.
    found['final_split_accuracy'] = {
      k[: -len('/accuracy')]: v
      for k, v in metrics.items()
      if k.endswith('/accuracy') and k[: -len('/accuracy')] in self._sources
    }
    if 'eval/ema_accuracy' in metrics:
      found['final_ema_eval_accuracy'] = metrics['eval/ema_accuracy']
    return found
