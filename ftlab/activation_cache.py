"""Frozen-prefix activation cache: run the frozen start of the network once per example.

When a plan trains nothing in the first blocks of the network and those blocks draw no random
numbers, their output is a function of the image alone: frozen BatchNorm layers run on their
running statistics (`train.bind_model`) and dropout lives only in the `fc` and `mlp` heads.
Without augmentation, every epoch would recompute the same prefix outputs; here they are
computed once per split (spread over all devices), kept in memory or in a file under the
workdir, and the steps run the rest of the network (`VGG(start_block=...)`) on them.

The cached run is the uncached run with the prefix's work moved out of the step: the batches
come in `input_pipeline.train_iterator`'s order (`input_pipeline.train_indices`) and the
prefix outputs are the numbers the step computes, to float rounding. XLA picks a convolution
kernel by shape, so each split is computed at the batch its step runs (the train batch for the
training split, the eval batch for eval splits); but an example is cached from one batch and
the step sees it in a shuffled one, and on CPUs whose kernels give a row other bits beside
other rows (an AMD EPYC without AVX2; GPUs, which autotune per program) the outputs differ in
their last bits. Where a row's bits do not depend on its neighbours (an Intel Xeon with
AVX-512) the cached run equals the uncached one bit for bit (tests/test_activation_cache.py
bounds the difference by the run's own sensitivity to one ulp).

A cache holds the examples of a split in `DataSplit.indices` order, with their labels; each
process keeps the examples its batches can take (the training shards its rows come from, its
part of each eval split: `Cache.positions`). A disk cache is a raw
array (`np.memmap`; on an object store, objects read into memory) plus a JSON file, put in
place once complete; its name carries a
fingerprint of the prefix's model, variables and data, so a resumed run reuses it, and so do
other runs given the same `config.activation_cache_dir` (the seeds and plans of a sweep that
share a frozen prefix and an eval split compute its outputs once).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import math
import os
from typing import Any, Callable, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import lax

from ftlab import parallel, paths, train
from ftlab.data import datasets, input_pipeline
from ftlab.errors import ConfigError
from ftlab.files import storage
from ftlab.plans import policies

PyTree = Any
MODES = ('off', 'auto', 'memory', 'disk')  # auto: memory up to a size limit, else disk
# Per split and per process: every process holds its own share in memory.
DEFAULT_MEMORY_LIMIT_MB = 2048
_FORMAT = 1  # bump when the file layout or the fingerprint changes


def start_block(model: nn.Module, plan: policies.Plan) -> str | None:
  """The first block the step must run for `plan`, or None when nothing can be cached.

  The blocks before it hold no parameter the plan trains (not even one entry of a
  per-element mask) and draw no random numbers in training (dropout).
  """
  trained = {paths.layer_of(p) for p, t in plan.flat_mask().items() if t}
  stochastic = set(model.stochastic_blocks())
  layers = {b.name: b.layers for b in model.block_structure().all_blocks}
  names = model.block_names()
  for i, name in enumerate(names):
    if name in stochastic or trained & set(layers.get(name, ())):
      # A prefix that is empty (the first block trains or draws dropout) saves nothing.
      return name if i else None
  return None  # a plan that trains nothing is refused by policies.make_plan


def check(model: nn.Module, plan: policies.Plan, start: str | None, *, augment: str) -> None:
  """Raises ConfigError, in one line naming the reason, unless the blocks before `start` can
  be cached for `plan`: no augmentation, no dropout and nothing trained in the prefix."""
  if augment != 'none':
    raise ConfigError(
      f'activation cache: augmentation {augment!r} changes the images every epoch; '
      "set dataset.augment='none' or activation_cache='off'"
    )
  names = model.block_names()
  if start is None or start == names[0]:
    first = start_block(model, plan) or names[0]
    raise ConfigError(
      f'activation cache: plan {plan.name} leaves no frozen prefix to cache (it trains or '
      f'draws dropout in {first})'
    )
  if start not in names:
    raise ConfigError(f'activation cache: {start!r} is not a block; valid: {list(names)}')
  prefix = names[: names.index(start)]
  stochastic = [b for b in prefix if b in model.stochastic_blocks()]
  if stochastic:
    raise ConfigError(
      f'activation cache: block {stochastic[0]} before {start} draws dropout in training, '
      'so its output is not a function of the image'
    )
  trained = [
    p for p, t in plan.flat_mask().items() if t and paths.layer_of(p) in _layers(model, prefix)
  ]
  if trained:
    raise ConfigError(
      f'activation cache: plan {plan.name} trains {trained[0]} in the cached prefix '
      f'(blocks before {start})'
    )


def check_mode(mode: str, model: nn.Module, plans: list[policies.Plan], *, augment: str) -> None:
  """The run-level check, before anything is computed: a valid mode, no augmentation, and
  at least one of the run's stage plans with a prefix to cache (others run uncached).

  Raises:
    ConfigError: in one line.
  """
  if mode not in MODES:
    raise ConfigError(f'activation_cache {mode!r} is not one of {list(MODES)}')
  if mode == 'off':
    return
  starts = [start_block(model, p) for p in plans]
  # The run is refused only if no stage can cache; a stage without a prefix (lp_ft's full
  # fine-tuning after the probe) runs uncached while the others use the cache.
  usable = [(p, s) for p, s in zip(plans, starts) if s is not None]
  plan, start = usable[0] if usable else (plans[0], None)
  check(model, plan, start, augment=augment)


@dataclasses.dataclass(frozen=True)
class Cache:
  """The prefix outputs of this process's share of one split, in `DataSplit.indices` order.

  Attributes:
    activations: `[m, ...]`, an array in memory or an `np.memmap`.
    labels: `[m]` int32.
    positions: the split positions held, ascending (`[m]` int64), or None for all of them.
  """

  activations: np.ndarray
  labels: np.ndarray
  positions: np.ndarray | None = None

  @property
  def num_examples(self) -> int:
    """Examples held by this process."""
    return len(self.labels)

  def batch(self, positions: np.ndarray) -> dict[str, np.ndarray]:
    """The cached rows of split `positions` (all held by this process)."""
    # Rows are held in ascending position order, so a sorted search maps a split position to
    # its row; the positions asked for are always among those held.
    rows = positions if self.positions is None else np.searchsorted(self.positions, positions)
    # Fancy indexing a memory map already copies the rows but keeps the `np.memmap` type;
    # `np.asarray` makes the batch a plain array, as `train_iterator`'s are.
    return {'image': np.asarray(self.activations[rows]), 'label': self.labels[rows]}


def _layers(model: nn.Module, blocks: list[str] | tuple[str, ...]) -> set[str]:
  by_name = {b.name: b.layers for b in model.block_structure().all_blocks}
  return {layer for b in blocks for layer in by_name.get(b, ())}


def _prefix_step(variables: PyTree, batch: dict, *, model: nn.Module) -> dict:
  # train=True as in the train step (frozen BatchNorm on running statistics); a prefix that
  # needed a dropout key would fail here. The gather gives every device the global batch,
  # so every process gets every example's output.
  x = model.apply(
    train.model_variables(variables['params'], variables.get('batch_stats', {})),
    batch['image'],
    train=True,
  )
  return lax.all_gather(
    {'x': x, 'label': batch['label'], 'mask': batch['mask']}, parallel.AXIS, tiled=True
  )


def fingerprint(model: nn.Module, variables: PyTree, start: str, data_key: str) -> str:
  """A hash of what the prefix outputs depend on: the model's fields, the prefix layers'
  variables and the data (`data_key`)."""
  h = hashlib.sha256(f'v{_FORMAT}|{start}|{data_key}|'.encode())
  # Left out: Flax bookkeeping and the fields a run sets around the model (the plan's frozen
  # BatchNorm list, the device axis, the block range), which differ between plans that share
  # the same prefix function. Every prefix layer is frozen (`check`), so it is on the frozen
  # BatchNorm list of every plan that can cache it.
  skip = ('parent', 'name', 'frozen_batch_norm', 'axis_name', 'start_block', 'stop_block')
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.name not in skip}
  h.update(repr(sorted(fields.items())).encode())
  prefix = _layers(model, model.block_names()[: model.block_names().index(start)])
  for collection in ('params', 'batch_stats'):
    for path, x in paths.flatten(variables.get(collection, {})).items():
      if paths.layer_of(path) in prefix:
        x = np.asarray(x)
        h.update(f'{collection}/{path}|{x.shape}|{x.dtype}|'.encode())
        # The values themselves, not a name or a seed: a cache must never outlive the weights it was
        # computed from (a resume after a stage that trained the prefix, another init checkpoint).
        h.update(np.ascontiguousarray(x).tobytes())
  return h.hexdigest()[:20]


def data_key(data: datasets.DataSplit, *, image_size: int, preprocess: str) -> str:
  """What identifies a split's images: dataset, split, chosen examples, labels, preprocessing."""
  # The chosen examples (a few-shot draw, a minival carve-out) and the label map are part of
  # the identity: two splits with the same name can hold different examples.
  h = hashlib.sha256(np.asarray(data.indices, np.int64).tobytes())
  if data.label_map is not None:
    h.update(np.asarray(data.label_map, np.int64).tobytes())
  builder = data.builder
  name = f'{getattr(builder, "name", type(builder).__name__)}|{getattr(builder, "data_dir", "")}'
  return f'{name}|{data.read_split}|{image_size}|{preprocess}|{h.hexdigest()}'


def compile_prefix(
  model: nn.Module, plan: policies.Plan, spread: parallel.Spread, start: str
) -> Callable:
  """`p_prefix(variables, batch)`: the blocks before `start` on a sharded padded batch
  (`{'image', 'label', 'mask'}`), gathered so every device holds the global batch's
  `{'x', 'label', 'mask'}`; feed it `spread.replicate`d variables."""
  prefix = train.bind_model(model.clone(stop_block=start), plan)
  return spread.compile(
    functools.partial(_prefix_step, model=prefix),
    in_kinds=(parallel.REPLICATED, parallel.SHARDED),
  )


def compute(
  p_prefix: Callable,
  variables: PyTree,
  spread: parallel.Spread,
  batches: Iterator[dict],
  num_examples: int,
  *,
  backend: str = 'auto',
  memory_limit_mb: float = DEFAULT_MEMORY_LIMIT_MB,
  path: str | None = None,
  keep: np.ndarray | None = None,
) -> Cache:
  """The prefix outputs of a split's examples that this process keeps.

  Every process feeds its contiguous part of the split and every process sees every output
  (the prefix step gathers them); each keeps only the positions in `keep`.

  Args:
    p_prefix: from `compile_prefix`.
    variables: `{'params', 'batch_stats'}` as the step will see them.
    spread: the run's `Spread`; every process takes part.
    batches: this process's padded batches of the split, `{'image', 'label', 'mask'}` as
      `input_pipeline.eval_iterator` yields them (process q's batches hold its part
      `input_pipeline.parts(num_examples, process_count)[q]`, in order).
    num_examples: examples in the split.
    keep: the split positions this process keeps, ascending (None: all).
    backend: `memory`, `disk` or `auto` (memory up to `memory_limit_mb`, else disk).
    memory_limit_mb: the `auto` threshold, in MiB of activations.
    path: file stem of the disk backend (`.bin` array, `.labels.npy`, `.json` description).

  Returns:
    The `Cache`.
  """
  if backend not in ('auto', 'memory', 'disk'):
    raise ValueError(f'activation cache backend {backend!r} is not memory, disk or auto')
  if backend != 'memory' and path is None:
    raise ValueError(f'activation cache: the {backend} backend needs a path')
  if num_examples == 0:
    raise ValueError('activation cache: the split has no examples')
  state = spread.replicate({'params': variables['params'], **_stats(variables)})
  count = jax.process_count()
  kept = num_examples if keep is None else len(keep)
  activations, labels, written = None, np.zeros(kept, np.int32), 0
  # Written under this process's own names, renamed into place once complete: runs sharing a
  # cache directory never read (or truncate) a file another run is writing.
  partial = f'{path}.{os.getpid()}.part'

  def allocate(x):
    # The prefix output's shape and dtype are known once the first batch is through.
    nonlocal backend
    shape = (kept,) + x.shape[1:]
    size_mb = math.prod(shape) * x.dtype.itemsize / 2**20
    if backend == 'auto':
      backend = 'memory' if size_mb <= memory_limit_mb else 'disk'
    logging.info(
      'activation cache: %d x %s %s, %.1f MiB (%s)',
      kept,
      shape[1:],
      x.dtype,
      size_mb,
      backend,
    )
    # An object store has no memory-mapped writes: the remote cache is built in memory and
    # uploaded by `_publish`.
    if backend == 'memory' or storage.is_remote(path):  # a remote cache is uploaded whole
      return np.empty(shape, x.dtype)
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    return np.memmap(partial + '.bin', dtype=x.dtype, mode='w+', shape=shape)

  def write(k, out):
    nonlocal activations, written
    out = jax.device_get(spread.unreplicate(out))
    if activations is None:
      activations = allocate(out['x'])
    positions = input_pipeline.gathered_positions(num_examples, count, len(out['mask']) // count, k)
    real = (out['mask'] > 0) & (positions >= 0)
    rows = positions[real] if keep is None else np.searchsorted(keep, positions[real])
    if keep is not None:
      # A sorted search finds where a position would go; it is ours only if `keep` holds it there.
      # The clamp keeps the lookup in bounds for positions past the last kept one.
      mine = (rows < len(keep)) & (keep[np.minimum(rows, len(keep) - 1)] == positions[real])
      rows, real = rows[mine], np.flatnonzero(real)[mine]
    activations[rows] = out['x'][real]
    labels[rows] = out['label'][real]
    written += len(rows)

  pending = []
  for k, batch in enumerate(batches):
    pending.append((k, parallel.in_dispatch_order(p_prefix(state, spread.shard(batch)))))
    if len(pending) > 1:  # the next batch runs while this one is copied to the host
      write(*pending.pop(0))
  for item in pending:
    write(*item)
  # Every kept position must be written exactly once; a shortfall means the batches did not
  # cover the split, and a partly filled cache would silently hold zeros.
  if written != kept:
    raise ValueError(f'activation cache: {written} of {kept} examples computed')
  if backend == 'disk':
    _publish(activations, labels, partial, path)
    # Read back through `load`, so a fresh cache and a reused one are the same kind of object
    # (a read-only memory map locally).
    return load(path, keep)
  return Cache(activations, labels, keep)


def _publish(activations: np.ndarray, labels: np.ndarray, partial: str, path: str) -> None:
  """Completes the disk cache and puts it at `path`'s names, the description last: the cache
  counts once `path.json` exists. Locally the memory map written under the `partial` stem is
  renamed into place; on an object store each object is uploaded whole."""
  description = json.dumps({'shape': list(activations.shape), 'dtype': activations.dtype.name})
  labels_npy = io.BytesIO()
  np.save(labels_npy, labels)
  if storage.is_remote(path):
    storage.write_whole(path + '.bin', np.ascontiguousarray(activations).tobytes())
    storage.write_whole(path + '.labels.npy', labels_npy.getvalue())
    storage.write_whole(path + '.json', description)
    return
  # The memory map's pages reach the file before the rename makes the cache visible.
  activations.flush()
  with open(partial + '.labels.npy', 'wb') as f:
    f.write(labels_npy.getvalue())
  with open(partial + '.json', 'w') as f:
    f.write(description)
  # In this order, `.json` last: a reader that finds the description finds the other two
  # complete. `os.replace` is atomic on one file system.
  for suffix in ('.bin', '.labels.npy', '.json'):
    os.replace(partial + suffix, path + suffix)


def load(path: str, keep: np.ndarray | None = None) -> Cache | None:
  """A complete disk cache at `path` (see `compute`) holding the positions `keep`, or None.

  A local cache is memory-mapped; one on an object store is read into memory.
  """
  if not storage.path(path + '.json').exists():
    return None
  description = json.loads(storage.path(path + '.json').read_text())
  dtype = np.dtype(jnp.dtype(description['dtype']))  # jnp knows bfloat16
  shape = tuple(description['shape'])
  labels = np.load(io.BytesIO(storage.path(path + '.labels.npy').read_bytes()))
  if storage.is_remote(path):
    raw = storage.path(path + '.bin').read_bytes()
    return Cache(np.frombuffer(raw, dtype).reshape(shape), labels, keep)
  activations = np.memmap(path + '.bin', dtype=dtype, mode='r', shape=shape)
  return Cache(activations, labels, keep)


def _stats(variables: PyTree) -> dict:
  stats = variables.get('batch_stats', {})
  return {'batch_stats': stats} if stats else {}


def train_batches(
  cache: Cache, order: input_pipeline.BatchOrder, num_examples: int, start_step: int = 0
) -> Iterator[dict[str, np.ndarray]]:
  """`input_pipeline.train_iterator`'s batches of a split of `num_examples` (with
  `augment='none'` and the same order and start step), each image replaced by its cached
  prefix output."""
  for positions in input_pipeline.train_indices(num_examples, order, start_step=start_step):
    yield cache.batch(positions)


def eval_batches(
  cache: Cache, order: input_pipeline.BatchOrder, num_examples: int
) -> Iterator[dict[str, np.ndarray]]:
  """`input_pipeline.eval_iterator`'s padded batches (for the same order) of a split of
  `num_examples`, each image replaced by its cached prefix output (padding rows are zeros
  with mask 0)."""
  batch = order.local_batch
  mine = input_pipeline.eval_share(num_examples, order)
  for k in range(input_pipeline.num_eval_steps(num_examples, order.global_batch)):
    positions = mine[k * batch : (k + 1) * batch]
    real = cache.batch(positions)
    out = {
      'image': np.zeros((batch,) + cache.activations.shape[1:], cache.activations.dtype),
      'label': np.zeros(batch, np.int32),
      'mask': np.zeros(batch, np.float32),
    }
    out['image'][: len(positions)] = real['image']
    out['label'][: len(positions)] = real['label']
    # The padding rows are zeros with mask 0, exactly as `eval_iterator` pads, so the cached
    # eval sums match the uncached ones.
    out['mask'][: len(positions)] = 1.0
    yield out


@dataclasses.dataclass(frozen=True)
class Prepared:
  """What the run loop swaps in while a plan's prefix is cached.

  Attributes:
    model: the model the steps run (`start_block` set; pass to `train.compile_steps`).
    start: the first block the steps run.
    train_batches: `start_step -> iterator` of host batches, as `train_iterator`'s.
    eval_batches: `{name: () -> iterator}` of padded host batches, as `eval_iterator`'s.
    extra_batches: the same for the `extra` splits of `prepare` (e.g. the few-shot probe's).
  """

  model: nn.Module
  start: str
  train_batches: Callable[[int], Iterator[dict]]
  eval_batches: dict[str, Callable[[], Iterator[dict]]]
  extra_batches: dict[str, Callable[[], Iterator[dict]]] = dataclasses.field(default_factory=dict)


def prepare(
  mode: str,
  model: nn.Module,
  plan: policies.Plan,
  variables: PyTree,
  spread: parallel.Spread,
  data: input_pipeline.Data,
  *,
  directory: str,
  memory_limit_mb: float = DEFAULT_MEMORY_LIMIT_MB,
  extra: Mapping[str, datasets.DataSplit] | None = None,
) -> Prepared | None:
  """The cached model and batches for `plan`, or None when the cache is off or the plan has
  no prefix to cache (run that stage uncached; `check_mode` refuses a run with none).

  Args:
    mode: one of `MODES`.
    model: the unbound model.
    plan: the (stage's) plan.
    variables: `{'params', 'batch_stats'}` as the stage starts (host or device arrays).
    spread: the run's `Spread`.
    data: the run's splits, order and image preparation; the training split and every
      evaluated split are cached.
    directory: where disk caches go (a run keeps them in its workdir, so a resume reuses
      them).
    memory_limit_mb: the `auto` threshold, in MiB of activations per split.
    extra: more splits to cache at the eval batch size, by name (`Prepared.extra_batches`).

  Raises:
    ConfigError: see `check`.
  """
  if mode not in MODES:
    raise ConfigError(f'activation_cache {mode!r} is not one of {list(MODES)}')
  start = start_block(model, plan)
  if mode == 'off' or start is None:
    return None
  check(model, plan, start, augment=data.augment)
  # On the host once: the fingerprint hashes the values, and each split's computation
  # replicates them afresh.
  variables = jax.device_get({'params': variables['params'], **_stats(variables)})
  pipeline = dict(image_size=data.image_size, preprocess=data.preprocess)
  p_prefix = compile_prefix(model, plan, spread, start)

  def cached(name, split, order, keep):
    # Each split at the batch its step would have run the prefix on: XLA's CPU convolutions
    # pick their kernel by shape, so an example's output bits depend on the per-device batch.
    # The process's share (`keep`) depends on the process count and the data shards.
    key = fingerprint(
      model,
      variables,
      start,
      f'{data_key(split, **pipeline)}|{order.global_batch}|{spread.num_devices}|'
      f'{order.process_count}|{order.shards}',
    )
    path = os.path.join(directory, f'{name}-{key}-p{order.process_index}')
    if mode != 'memory':
      found = load(path, keep)
      if found is not None and found.num_examples == len(keep):
        logging.info('activation cache: reusing %s', path)
        return found
    batches = input_pipeline.eval_iterator(split, order, **pipeline)
    return compute(
      p_prefix,
      variables,
      spread,
      batches,
      split.num_examples,
      backend=mode,
      memory_limit_mb=memory_limit_mb,
      path=path,
      keep=keep,
    )

  # Each process holds the training shards its rows come from and its part of each eval split.
  shards = input_pipeline.parts(data.train.num_examples, data.order.shards)
  # A process's training batches draw only from the shards its rows come from
  # (`BatchOrder.shard_rows`), so it caches those shards and nothing else.
  train_keep = np.concatenate([shards[j] for j, _, _ in data.order.shard_rows()])
  eval_order = data.order.with_batch(data.eval_batch)
  train_cache = cached('train', data.train, data.order, np.unique(train_keep))
  splits = {**data.evals, **(extra or {})}
  eval_caches = {
    name: cached(name, split, eval_order, input_pipeline.eval_share(split.num_examples, eval_order))
    for name, split in splits.items()
  }
  n = {name: split.num_examples for name, split in splits.items()}
  batches = {
    name: functools.partial(eval_batches, c, eval_order, n[name]) for name, c in eval_caches.items()
  }
  return Prepared(
    model=model.clone(start_block=start),
    start=start,
    train_batches=functools.partial(
      train_batches, train_cache, data.order, data.train.num_examples
    ),
    # The run's evaluated splits and the evaluators' own splits are kept apart: the stage's
    # `StageView` gives every evaluator the first as `eval_batches`, the second as
    # `extra_batches`.
    eval_batches={name: batches[name] for name in data.evals},
    extra_batches={name: batches[name] for name in extra or {}},
  )
