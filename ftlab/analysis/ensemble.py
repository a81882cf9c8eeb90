"""Scoring models exactly: single models, output ensembles, BatchNorm statistics recomputed.

An `ExactEval` holds one architecture's compiled steps and eval data and scores variables with
the run loop's exact eval (`train.evaluate`: padded, masked batches, sums over devices):

- one model (`evaluate`);
- an output ensemble: every member sees the same batch, and their logits (`logits`) or
  probabilities (`probs`) are averaged (`evaluate_ensemble`);
- a parameter average (a soup, a WiSE-FT point), whose BatchNorm running statistics are stale,
  gets fresh ones from K training batches (`reset_batch_stats`).

`ftlab.analysis.combine` puts these together over finished runs.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ftlab import parallel, paths, train
from ftlab.errors import InputError

PyTree = Any

OUTPUT_ENSEMBLES = ('logits', 'probs')
# Batches are kept in host memory for reuse (each model and soup reads them again) below this.
CACHE_BYTES = 2 << 30


class BatchStatsError(InputError):
  """No training batches to recompute BatchNorm statistics from."""


# --- Per-device steps. ------------------------------------------------------------------------


def ensemble_eval_step(
  members: Sequence[PyTree], batch: dict, *, model: nn.Module, combine: str
) -> dict:
  """`train.eval_step` for the combined outputs of several models on one batch.

  Args:
    members: one variables dict per model (replicated).
    batch: `{'image', 'label', 'mask'}`, this device's share.
    model: the bound model.
    combine: `logits` (mean logits, then softmax) or `probs` (mean probabilities).

  Returns:
    `loss_sum`, `correct` and `count` over the real examples of the global batch.
  """
  # The members' forward passes are the very eval forward of train.eval_step, one after
  # the other in one program (a vmap over stacked weights would batch the convolutions
  # differently and lose bit-equality with single-model eval).
  logits = [model.apply(v, batch['image'], train=False) for v in members]
  labels = batch['label']
  if combine == 'logits':
    # x0 + mean(xi - x0): exactly x0 when every member agrees (copies of one model).
    combined = logits[0]
    if len(logits) > 1:
      combined = combined + sum(x - logits[0] for x in logits[1:]) / len(logits)
    loss = train.cross_entropy(combined, labels)
  elif combine == 'probs':
    # log(mean_m p_m) = logsumexp_m(log p_m) - log M, stable for confident members.
    log_probs = jnp.stack([jax.nn.log_softmax(x) for x in logits])
    combined = jax.nn.logsumexp(log_probs, axis=0) - jnp.log(len(logits))
    loss = -jnp.take_along_axis(combined, labels[:, None], axis=-1)[:, 0]
  else:
    raise ValueError(f'unknown output ensemble {combine!r}; valid: {OUTPUT_ENSEMBLES}')
  mask = batch.get('mask', jnp.ones(labels.shape, jnp.float32)).astype(jnp.float32)
  sums = {
    'loss_sum': jnp.sum(loss * mask),
    'correct': jnp.sum((jnp.argmax(combined, -1) == labels) * mask),
    'count': jnp.sum(mask),
  }
  return lax.psum(sums, parallel.AXIS)


def batch_stats_step(
  variables: PyTree, batch: dict, *, model: nn.Module, momenta: Mapping[str, float]
) -> PyTree:
  """This global batch's BatchNorm statistics (mean and variance per layer), no update.

  Args:
    variables: `{'params', 'batch_stats'}` (replicated); only the parameters matter.
    batch: `{'image'}`, this device's share.
    model: the model with every BatchNorm layer in train mode, averaging over `'batch'`.
    momenta: BatchNorm layer path (`block1_conv1_bn`) -> its momentum m (`batch_norm_momenta`).

  Returns:
    A tree shaped like `batch_stats`, the same on every device.
  """
  # Flax updates running = m * running + (1 - m) * batch; from running = 0 that is
  # (1 - m) * batch, which the division undoes (to within one rounding).
  zeros = jax.tree.map(jnp.zeros_like, variables['batch_stats'])
  _, updated = model.apply(
    {'params': variables['params'], 'batch_stats': zeros},
    batch['image'],
    train=True,
    mutable=['batch_stats'],
    rngs={'dropout': jax.random.key(0)},  # the head's dropout: its output is unused here
  )
  flat = paths.flatten(updated['batch_stats'])
  return paths.unflatten({p: x / (1 - momenta[paths.layer_of(p)]) for p, x in flat.items()})


def batch_norm_momenta(model: nn.Module, variables: PyTree, image_size: int) -> dict[str, float]:
  """BatchNorm layer path -> momentum, read off the modules as they are called (no compute)."""
  momenta = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.BatchNorm) and context.method_name == '__call__':
      momenta[paths.SEP.join(context.module.path)] = float(context.module.momentum)
    return next_fun(*args, **kwargs)

  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  return momenta


# --- Evaluating models and combinations. ------------------------------------------------------


def replayable(make_batches: Callable[[], Iterator[dict]], num_batches: int) -> Callable:
  """A function giving the same first `num_batches` batches of `make_batches()` at every call.

  Read on the first call, and kept in host memory when they fit in `CACHE_BYTES` (every model
  and soup reads them again); larger ones are read again each time.
  """
  kept: list[list[dict]] = []

  def batches() -> Iterator[dict]:
    if kept:
      return iter(kept[0])
    fresh = itertools.islice(make_batches(), num_batches)
    # The first batch tells the size of all of them (eval batches are padded to one shape), so
    # the decision to keep them is made before reading the rest.
    first = next(fresh, None)
    if first is None:
      return iter(())
    if sum(np.asarray(x).nbytes for x in first.values()) * num_batches > CACHE_BYTES:
      return itertools.chain([first], fresh)
    kept.append([first, *fresh])
    return iter(kept[0])

  return batches


@dataclasses.dataclass
class ExactEval:
  """One architecture's compiled steps and data: scores variables and output ensembles, and
  recomputes BatchNorm statistics.

  Attributes:
    model: the unbound model.
    spread: how steps run over the devices.
    eval_batches: split name (`eval`, `minival`) -> a function giving its padded batches.
    train_batches: a function giving the statistics-reset batches, or None.
    image_size: input side, pixels.
  """

  model: nn.Module
  spread: parallel.Spread
  eval_batches: Mapping[str, Callable[[], Iterator[dict]]]
  train_batches: Callable[[], Iterator[dict]] | None
  image_size: int

  def __post_init__(self):
    # No frozen BatchNorm list: evaluation runs in inference mode, where every BatchNorm uses
    # its running statistics anyway.
    bound = self.model.clone(axis_name=parallel.AXIS)
    kinds = (parallel.REPLICATED, parallel.SHARDED)
    self._p_eval_step = self.spread.compile(
      functools.partial(train.eval_step, model=bound), in_kinds=kinds
    )
    self._p_ensemble_steps = {
      c: self.spread.compile(
        functools.partial(ensemble_eval_step, model=bound, combine=c), in_kinds=kinds
      )
      for c in OUTPUT_ENSEMBLES
    }
    self._p_stats_step = None

  def evaluate(self, variables: PyTree, split: str = 'eval') -> dict:
    """The run loop's exact eval of one model: `loss`, `accuracy`, `count`."""
    state = train.TrainState(
      step=np.zeros((), np.int32),
      params=variables['params'],
      batch_stats=variables.get('batch_stats', {}),
      opt_state=(),
    )
    state = self.spread.replicate(state)
    return train.evaluate(self._p_eval_step, state, self.spread, self.eval_batches[split]())

  def evaluate_ensemble(self, members: Sequence[PyTree], combine: str, split: str = 'eval') -> dict:
    """Exact eval of the members' averaged logits (`logits`) or probabilities (`probs`)."""
    # All members on the devices at once: each batch is read and sharded once for the whole
    # ensemble.
    replicated = self.spread.replicate(list(members))
    return train.evaluate(
      self._p_ensemble_steps[combine], replicated, self.spread, self.eval_batches[split]()
    )

  def reset_batch_stats(self, variables: PyTree) -> PyTree:
    """`variables` with `batch_stats` the mean of the statistics of the reset batches.

    Every BatchNorm layer runs in train mode on each batch (statistics over the global batch,
    as in training); nothing else changes.
    """
    if self.train_batches is None:
      raise BatchStatsError('no training batches for the BatchNorm statistics reset')
    if self._p_stats_step is None:
      momenta = batch_norm_momenta(self.model, variables, self.image_size)
      step = functools.partial(
        batch_stats_step,
        # Every BatchNorm in train mode, whatever a plan froze: the point is to measure the
        # statistics of the averaged weights in every layer.
        model=self.model.clone(axis_name=parallel.AXIS, frozen_batch_norm=()),
        momenta=momenta,
      )
      kinds = (parallel.REPLICATED, parallel.SHARDED)
      self._p_stats_step = self.spread.compile(step, in_kinds=kinds)
    replicated = self.spread.replicate(variables)
    total, count = None, 0
    for batch in self.train_batches():
      stats = self._p_stats_step(replicated, self.spread.shard({'image': batch['image']}))
      total = stats if total is None else jax.tree.map(jnp.add, total, stats)
      count += 1
    if not count:
      raise BatchStatsError('the BatchNorm statistics reset got no training batches')
    total = jax.device_get(self.spread.unreplicate(total))
    # The mean of per-batch statistics (variance included), as a running average with equal
    # weights would give, rather than a pooled variance over all the batches' examples.
    mean = jax.tree.map(lambda x: (np.asarray(x, np.float64) / count).astype(x.dtype), total)
    return {**variables, 'batch_stats': mean}
