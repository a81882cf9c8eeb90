"""Score passes over the training data, and a dynamic mask's change, on the devices.

Per-element plans choose entries by scores of the training data: the empirical Fisher's
diagonal (`fisher_step`: mean squared per-example gradient; FISH, Child-Tuning_D) or the mean
loss gradient (`gradient_step`: RigL's growth criterion). Both run the model in inference mode
(running BatchNorm statistics, no dropout) over the leaves a plan could train, spread over
the devices like the train step. A `Scorer` is the run's service: it compiles each pass once,
gives the first masks their scores on the host (`scores`), and changes a dynamic plan's mask
between steps (`remask`) on the replicated train state, on the devices: the pass, the top-k
and the optimizer-state surgery (`ftlab.plans.dynamic_masks.remask`) never bring the state
to the host.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import lax

from ftlab import paths
from ftlab.data.input_pipeline import Data
from ftlab.parallel import AXIS, REPLICATED, SHARDED, Spread, in_dispatch_order
from ftlab.plans import dynamic_masks, policies
from ftlab.train import TrainState, bind_model, cross_entropy, model_variables

PyTree = Any
PASSES = {'fisher': 'squared_grads', 'gradient': 'grads'}  # kind -> the summed output


def fisher_step(
  state: TrainState, batch: dict, *, model: nn.Module, trainable_mask: PyTree, chunk: int = 8
) -> dict:
  """Sums of squared per-example gradients (the empirical Fisher's diagonal, unnormalised)
  of the trainable leaves over the real examples of the global batch.

  The model runs in inference mode (running BatchNorm statistics, no dropout), so each
  example's gradient is its own. Examples are taken `chunk` at a time (vmap inside a
  scan) so memory grows with the chunk, not the batch.

  Args:
    state: the replicated train state.
    batch: `{'image', 'label'}` and optionally `'mask'`, this device's share; its size must
      be a multiple of `chunk` (pass chunk=1 otherwise).
    model: the bound model.
    trainable_mask: which leaves to score.
    chunk: examples per vmapped gradient.

  Returns:
    `{'squared_grads': {path: sum of g**2}, 'count': number of real examples}`.
  """
  scored, fixed = paths.split(state.params, trainable_mask)
  # Padding rows are computed (every device needs the same shapes) and weighted 0, so the
  # sums are exact over the split's real examples.
  weights = batch.get('mask', jnp.ones(batch['label'].shape, jnp.float32)).astype(jnp.float32)

  def example_loss(leaves, image, label):
    params = paths.merge(fixed, leaves)
    # One example as a batch of one: in inference mode nothing couples the examples of a batch,
    # so this is the example's own gradient, not its share of a batch gradient.
    logits = model.apply(model_variables(params, state.batch_stats), image[None], train=False)
    return cross_entropy(logits, label[None]).sum()

  def add_chunk(total, xs):
    image, label, weight = xs
    grads = jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))(scored, image, label)
    # Squared before summing over the chunk: the Fisher diagonal is a mean of squares, in
    # which examples never cancel, as they can in the summed gradient of `gradient_step`.
    squares = jax.tree.map(lambda g: jnp.einsum('b...,b->...', g * g, weight), grads)
    return jax.tree.map(jnp.add, total, squares), None

  n = batch['label'].shape[0]
  if n % chunk:
    raise ValueError(f'fisher_step: {n} examples per device is not a multiple of chunk={chunk}')
  xs = jax.tree.map(
    lambda x: x.reshape(n // chunk, chunk, *x.shape[1:]),
    (batch['image'], batch['label'], weights),
  )
  zeros = jax.tree.map(jnp.zeros_like, scored)
  # A scan over chunks: a vmap over the whole share would hold one gradient per example of
  # every scored leaf at once (each as large as the leaf itself).
  total, _ = lax.scan(add_chunk, zeros, xs)
  # Sums, with the count beside them: the mean is taken once over every batch of the pass
  # (`Scorer.scores`), exact whatever the padding.
  return lax.psum({'squared_grads': total, 'count': jnp.sum(weights)}, AXIS)


def gradient_step(
  state: TrainState, batch: dict, *, model: nn.Module, trainable_mask: PyTree
) -> dict:
  """The gradient of the summed loss over the real examples of the global batch, with the
  model in inference mode (RigL's growth criterion, `ftlab.plans.dynamic_masks`).

  Args:
    state: the replicated train state.
    batch: `{'image', 'label'}` and optionally `'mask'`, this device's share.
    model: the bound model.
    trainable_mask: which leaves to differentiate.

  Returns:
    `{'grads': {path: summed gradient}, 'count': number of real examples}`.
  """
  scored, fixed = paths.split(state.params, trainable_mask)
  weights = batch.get('mask', jnp.ones(batch['label'].shape, jnp.float32)).astype(jnp.float32)

  def loss_fn(leaves):
    params = paths.merge(fixed, leaves)
    logits = model.apply(model_variables(params, state.batch_stats), batch['image'], train=False)
    return jnp.sum(cross_entropy(logits, batch['label']) * weights)

  grads = jax.grad(loss_fn)(scored)
  return lax.psum({'grads': grads, 'count': jnp.sum(weights)}, AXIS)


def compile_scoring_step(
  kind: str, spread: Any, model: nn.Module, scope: policies.Plan, global_batch: int
) -> Callable:
  """`fisher_step` (`kind='fisher'`) or `gradient_step` (`'gradient'`) over the leaves
  `scope` may train, spread: `p_step(state, batch) -> sums`. `model` is bound (`bind_model`)."""
  step_fn = functools.partial(
    fisher_step if kind == 'fisher' else gradient_step,
    model=model,
    trainable_mask=scope.trainable_mask,
  )
  if kind == 'fisher':  # per-example gradients in chunks that divide the device's share
    # The largest chunk up to 8 that divides the share: 8 per-example gradients of VGG's fc1
    # (100M entries) are already 3 GB in float32.
    per_device = global_batch // jax.device_count()
    step_fn = functools.partial(step_fn, chunk=max(c for c in range(1, 9) if per_device % c == 0))
  return spread.compile(step_fn, in_kinds=(REPLICATED, SHARDED))


@dataclasses.dataclass
class Scorer:
  """The run's score passes and dynamic-mask changes, each compiled once.

  Attributes:
    spread: how the passes run over the devices.
    model: the run's model (unbound).
    scope: the plan whose trainable leaves are scored (the first stage's, made on shapes:
      every leaf any of its masks may choose).
    data: the run's data; passes read its training split unaugmented, in the run's order.
  """

  spread: Spread
  model: nn.Module
  scope: policies.Plan
  data: Data
  _compiled: dict = dataclasses.field(default_factory=dict, repr=False)

  def _pass(self, kind: str) -> Callable:
    if kind not in self._compiled:
      self._compiled[kind] = compile_scoring_step(
        kind,
        self.spread,
        bind_model(self.model, self.scope),
        self.scope,
        self.data.order.global_batch,
      )
    return self._compiled[kind]

  def _batches(self, num_batches: int | None, start_step: int) -> Iterator[dict]:
    """The training batches of the steps after `start_step` (unaugmented), or every training
    example once when `num_batches` is None."""
    if num_batches is None:
      return self.data.eval_batches('train', self.data.order.global_batch)
    return itertools.islice(self.data.train_batches(start_step, augment='none'), num_batches)

  def _sums(self, kind: str, state: Any, num_batches: int | None, start_step: int) -> dict:
    """The pass's sums over the batches, replicated on the devices."""
    p_step, totals = self._pass(kind), None
    for batch in self._batches(num_batches, start_step):
      sums = in_dispatch_order(p_step(state, self.spread.shard(batch)))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    return totals

  def scores(self, kind: str, num_batches: int | None, variables: PyTree) -> dict[str, np.ndarray]:
    """`{path: mean score}` on the host: the mean squared per-example gradient (`fisher`) or
    the mean gradient (`gradient`) of every leaf of the scope at `variables`, over
    `num_batches` training batches from step 0 (every training example once if None)."""
    stats = variables.get('batch_stats', {})
    # No optimizer state: the passes read the parameters and statistics only, and the plan's
    # optimizer does not exist yet (it is built from the masks these scores choose).
    state = self.spread.replicate(
      TrainState(jnp.zeros((), jnp.int32), variables['params'], stats, ())
    )
    sums = jax.device_get(self.spread.unreplicate(self._sums(kind, state, num_batches, 0)))
    count = max(float(sums['count']), 1.0)
    flat = paths.flatten(sums[PASSES[kind]])
    logging.info('%s scores from %d examples over %d leaves', kind, count, len(flat))
    return {p: np.asarray(v) / count for p, v in flat.items()}

  def remask(self, plan: policies.Plan, state: Any, steps_done: int) -> Any:
    """The replicated `state` with a dynamic plan's next mask when one is due before step
    `steps_done + 1` (`ftlab.plans.dynamic_masks`), else `state` itself. The scores are
    estimated on the current weights, over the training batches of the steps to come
    (unaugmented), so a resumed run chooses the same mask. The state is donated."""
    dynamic = plan.dynamic
    if not dynamic_masks.is_due(dynamic, steps_done):
      return state
    sums = {}
    # A `magnitude` rule reads the weights themselves: no pass, no gradient computed.
    if dynamic.score in PASSES:
      # The pass reads the weights only: the same tree `scores` passes, so one compile serves
      # the first mask and every change.
      weights = TrainState(state.step, state.params, state.batch_stats, ())
      sums = self._sums(dynamic.score, weights, dynamic.num_batches, steps_done)
    # Keyed by the `DynamicMask` itself (a frozen dataclass): a plan whose mask schedule
    # changes between stages gets its own compiled step.
    if dynamic not in self._compiled:
      step = functools.partial(_remask_step, dynamic=dynamic)
      self._compiled[dynamic] = self.spread.compile(
        step, in_kinds=(REPLICATED, REPLICATED), donate_argnums=(0,)
      )
    state, stats = self._compiled[dynamic](state, sums)
    # One small transfer, for the log line; the new mask itself never leaves the devices.
    stats = jax.device_get(self.spread.unreplicate(stats))
    logging.info(
      'step %d: %s mask: %d of %d entries new',
      steps_done + 1,
      dynamic.kind,
      stats['entered'],
      stats['trained'],
    )
    return state


def _remask_step(state: Any, sums: dict, *, dynamic: dynamic_masks.DynamicMask) -> tuple:
  """The state with the next mask (the same on every device: no collective is needed)."""
  scores = {}
  if sums:
    count = jnp.maximum(sums['count'].astype(jnp.float32), 1.0)
    flat = paths.flatten(sums[PASSES[dynamic.score]])
    scores = {p: flat[p] / count for p in dynamic.scope if p in flat}
  # The mask lives in the optimizer state (`optim.EntryMaskState`): a mask change is a change
  # of the optimizer state only; the parameters keep their values.
  opt_state, stats = dynamic_masks.remask(state.opt_state, state.params, scores, dynamic=dynamic)
  return state.replace(opt_state=opt_state), stats
