"""Starting a run from pretrained weights: strict, with the fix for a mismatch.

`config.init.checkpoint` names a run's workdir or checkpoint directory, a directory written by
`scripts/port_weights.py`, or named weights (`keras:vgg16`, `ftlab.porting.weights`), which are
downloaded, verified and ported once. `source` resolves it, with the port's record (`port.json`):
the preprocessing the weights expect (`preprocessing` checks the config against it, and
`auto` takes it), and for named weights the name, URL and checksum for the run's summary.

`variables` initialises a model, then loads the checkpoint into it: every parameter found and
of its shape, except those a `dont_load` regex keeps fresh (a new head), and no inf or NaN.
Named weights keep a fresh head by themselves where the task's differs (another class count,
another head type), and say so. A checkpoint that does not fit says why and which flags fix it
(`mismatch_advice`): another VGG (name, width, head), another class count (a fresh head), or
an fc1 built for another image size (the image size or an adaptive pool, not `dont_load`,
which would throw the pretrained layer away).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ftlab import paths
from ftlab.errors import InputError
from ftlab.files import checkpoint, storage
from ftlab.models import vgg
from ftlab.plans import tuners
from ftlab.porting import weights
from ftlab.porting.common import PortError

PyTree = Any


class InitError(InputError):
  """The init checkpoint is missing, does not fit the model, or holds inf/NaN (one line)."""


SCRATCH = 'scratch'  # `init.checkpoint` for a random start, said explicitly


@dataclasses.dataclass(frozen=True)
class Source:
  """Where the initial weights come from.

  Attributes:
    checkpoint: the config's value (a path, named weights, or '' / `scratch` for none).
    directory: the checkpoint directory to read ('' for a random start).
    record: the port's record (`port.json`) where there is one, else None.
  """

  checkpoint: str
  directory: str = ''
  record: dict | None = None

  @property
  def named(self) -> bool:
    return bool(self.record and 'weights' in self.record)

  def summary(self) -> dict:
    """What a run's summary says of its initial weights."""
    if not self.directory:
      return {'checkpoint': 'scratch (random init)'}
    found = {'checkpoint': self.checkpoint, 'directory': self.directory}
    if self.record:
      found['preprocessing'] = self.record.get('preprocessing', {}).get('name')
      found.update({k: self.record[k] for k in ('weights', 'format', 'arch') if k in self.record})
    return found


def source(init_cfg: Any) -> Source:
  """Resolves `init_cfg.checkpoint`; named weights are downloaded and ported (once).

  Raises:
    InitError: unknown named weights, a failed download (offline: the error names the URL and
      where a file downloaded by hand is picked up), or a file that does not port.
  """
  value = str(init_cfg.checkpoint or '')
  if value in ('', SCRATCH):
    return Source(value)
  if weights.is_name(value):
    try:
      directory, record = weights.resolve(value)
    except PortError as e:
      raise InitError(f'init.checkpoint: {e}') from None
    return Source(value, directory, record)
  try:
    root = storage.path(value, 'init.checkpoint')
  except storage.UnsupportedPath as e:
    raise InitError(str(e)) from None
  directory = value
  if (root / 'checkpoints').is_dir():  # a run's workdir
    directory = os.path.join(directory, 'checkpoints')
  record = None
  if (root / 'port.json').exists():
    record = json.loads((root / 'port.json').read_text())
  return Source(value, directory, record)


def preprocessing(configured: str, found: Source) -> str:
  """The input convention to train with: the config's, checked against the weights' record;
  `auto` takes the weights' own.

  Raises:
    InitError: `auto` without weights that record a convention, or a configured convention
      other than the one the weights were trained with (unless the record's is a guess).
  """
  recorded = (found.record or {}).get('preprocessing', {})
  name = recorded.get('name')
  if configured == 'auto':
    if not name:
      raise InitError(
        'dataset.preprocess=auto takes the convention of the init weights, and '
        f'{found.checkpoint or "a random start"!r} records none; set caffe, torch or unit'
      )
    return name
  # A recorded convention is a fact about the weights, so a different one is refused; a
  # guessed one (a port that could not tell) only warns, and the config wins.
  if name and configured != name and not recorded.get('guess'):
    raise InitError(
      f'init.checkpoint {found.checkpoint} was trained on {name} inputs (its port.json) but '
      f'dataset.preprocess is {configured!r}: set --config.dataset.preprocess={name} (or auto); '
      'other inputs run and silently lose accuracy'
    )
  if name and configured != name:
    logging.warning(
      'dataset.preprocess %s overrides the guess %s of %s', configured, name, found.checkpoint
    )
  return configured


def fresh_head(model: nn.Module, shapes: dict, directory: str) -> tuple[str, ...]:
  """`dont_load` regexes that keep the task's own head where named weights' differs: head
  layers the weights lack or shape otherwise (another class count), and weights' layers the
  model lacks (a top the task does not use)."""
  stored = checkpoint.stored_shapes(directory)
  layers = lambda flat: {paths.layer_of(p) for p in flat}
  head = set(model.block_structure().head.layers)
  differ = {paths.layer_of(p) for p, s in shapes.items() if stored.get(p) != s}
  # Only head layers may differ in shape: a backbone layer of another shape stays a mismatch,
  # which names the model flags that fix it instead of silently training it from scratch.
  fresh = sorted((differ & head) | (layers(stored) - layers(shapes)))
  if fresh:
    logging.info('named weights: %s start fresh (not in the weights, or another shape)', fresh)
  return tuple(f'{layer}/.*' for layer in fresh)


def variables(
  model: nn.Module, image_size: int, rng: jax.Array, init_cfg: Any, found: Source | None = None
) -> PyTree:
  """Fresh variables, then (if there is a source) the checkpoint's, strictly checked.

  Parameters matching an `init_cfg.dont_load` regex keep their fresh values (a new head); with
  named weights, so does a head the task shapes otherwise (`fresh_head`).

  Raises:
    InitError: the checkpoint is missing, does not fit the model (the message says the
      likely cause and the flags that fix it) or holds inf/NaN (unless
      `init_cfg.allow_nonfinite`).
  """
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  # Jitted: eager init dispatches every initializer op by op, and VGG's fc1 alone is about
  # 100M random draws. Fresh values exist even when a checkpoint follows: they are the
  # structure `load_params` checks against and what `dont_load` keeps.
  fresh = jax.jit(functools.partial(model.init, train=False))(rng, x)
  found = found or source(init_cfg)
  if not found.directory:
    return fresh
  dont_load = tuple(init_cfg.dont_load)
  source_dir = found.directory
  # Named weights come with a fixed head (ImageNet's 1,000 classes): a task's own head is
  # kept fresh automatically; a path given by the user is loaded as strictly as written.
  if found.named:
    extra = fresh_head(
      model, {p: x.shape for p, x in paths.flatten(fresh['params']).items()}, source_dir
    )
    dont_load += tuple(r for r in extra if r not in dont_load)
  allow_nonfinite = bool(init_cfg.get('allow_nonfinite', False))
  load = functools.partial(load_params, source_dir, allow_nonfinite=allow_nonfinite)
  try:
    loaded = {'params': load(fresh['params'], dont_load=dont_load)}
    if 'batch_stats' in fresh:
      # The same patterns, less those that name no statistics (a dense head has none).
      stats_paths = paths.flatten(fresh['batch_stats'])
      stats_dont_load = [p for p in dont_load if any(re.fullmatch(p, q) for q in stats_paths)]
      loaded['batch_stats'] = load(
        fresh['batch_stats'], dont_load=stats_dont_load, key='batch_stats'
      )
  # The advice is computed only on failure, from the error's shapes: a fitting checkpoint
  # costs no architecture guessing.
  except checkpoint.MismatchError as e:
    advice = mismatch_advice(e, model, image_size)
    raise InitError(f'init.checkpoint: {e}' + (f'. {advice}' if advice else '')) from None
  except checkpoint.NonFiniteError as e:
    raise InitError(
      f'init.checkpoint: {e}; a run started from them trains to NaN. Re-export the weights '
      '(a float16 save overflows beyond 65504), or set --config.init.allow_nonfinite=True '
      'to load them anyway'
    ) from None
  except FileNotFoundError as e:
    raise InitError(f'init.checkpoint: {e}') from None
  return loaded


def mismatch_advice(error: checkpoint.MismatchError, model: Any, image_size: int) -> str:
  """The likely cause of a checkpoint that does not fit the model, and the flags that fix it:
  another VGG (name, width, head), another class count, or an fc1 built for another image
  size; '' when the shapes tell nothing more than the error."""
  # An unused `dont_load` regex is almost always a path spelled in another convention (torch's
  # dots, a missing layer prefix), so the layer names are the useful hint.
  if error.unused_dont_load:
    layers = sorted({paths.layer_of(p) for p in error.expected})
    return f'Paths are layer/name (e.g. predictions/kernel); the layers: {", ".join(layers)}'
  want, have = vgg.architecture_of(error.expected), vgg.architecture_of(error.found)
  fixes = []
  if have['name'] and have['name'] != want['name']:
    fixes.append(f'--config.model.name={have["name"]}')
  if have['width'] and want['width'] and not np.isclose(have['width'], want['width']):
    fixes.append(f'--config.model.width={have["width"]:g}')
  # A headless checkpoint (`none`) fits any head with a fresh one, handled below; it does not
  # call for another head type.
  if have['head'] != want['head'] and have['head'] != 'none':
    fixes.append(f'--config.model.head={have["head"]}')
  if fixes:
    found = f'a {have["name"] or "VGG"} (width {have["width"]:g}, {have["head"]} head)'
    return f'Likely cause: the checkpoint is {found}, another model: {" ".join(fixes)}'
  advice = []
  layers = lambda names: {paths.layer_of(p) for p in names}
  fresh = sorted(layers(set(error.expected) - error.skipped) - layers(error.found))
  if fresh and have['head'] == 'none':
    regexes = ', '.join(f'"{layer}/.*"' for layer in fresh)
    advice.append(
      f'the checkpoint has no head: start {", ".join(fresh)} fresh with '
      f"--config.init.dont_load='({regexes},)'"
    )
  differs = lambda p: (
    p in error.found
    and p in error.expected
    and p not in error.skipped
    and error.found[p] != error.expected[p]
  )
  if differs('predictions/kernel'):
    advice.append(
      f"the checkpoint's head has {have['num_classes']} classes, this task "
      f'{want["num_classes"]}: keep a fresh head with '
      """--config.init.dont_load='("predictions/.*",)'"""
    )
  first_dense = next((p for p in ('fc1/kernel', 'fc/kernel') if differs(p)), '')
  if first_dense:
    channels = vgg.scaled(vgg.BLOCK_CHANNELS[-1], model.width)
    # fc1 reads a side x side x channels flatten, so its input count gives the map side it was
    # built for; five 2x2 pools make the image 32 times that side.
    built = math.isqrt(error.found[first_dense][0] // channels)
    now = math.isqrt(error.expected[first_dense][0] // channels)
    layer = paths.layer_of(first_dense)
    advice.append(
      f'{layer} was built for a {built}x{built}x{channels} block-5 map ({built * 32} px images '
      f'without pooling), and this model gives it {now}x{now} at image_size {image_size}: keep '
      f'the pretrained {layer} with --config.dataset.image_size={built * 32}, or with '
      f'--config.model.adaptive_pool={built} (average-pools block 5 to {built}x{built} at any '
      'image size, as torchvision does)'
    )
  return ('Likely cause: ' + '; and '.join(advice)) if advice else ''


def load_params(
  directory: Any, expected: PyTree, *, key: str = 'params', step: int | None = None, **kwargs
) -> PyTree:
  """`checkpoint.load_params` that reads a tuned run's checkpoint as plain parameters: the
  stored adapters (any tuner's, `ftlab.plans.tuners`) are loaded, strictly as every other
  leaf, and folded into their kernels. A checkpoint without adapters loads exactly as
  `checkpoint.load_params` does.

  Args:
    directory, expected, key, step, kwargs: as `checkpoint.load_params`; `expected` is the
      plain model's tree.

  Returns:
    A tree with the structure of `expected` (numpy leaves).

  Raises:
    As `checkpoint.load_params`.
  """
  stored = checkpoint.stored_shapes(directory, step, key)
  adapters = {p: s for p, s in stored.items() if tuners.is_adapter(p)}
  if not adapters:
    return checkpoint.load_params(directory, expected, key=key, step=step, **kwargs)
  flat = paths.flatten(expected)
  dtypes = checkpoint.stored_dtypes(directory, step, key)
  # The adapters are expected as stored (shape and dtype), so they pass the strict check and
  # are loaded without a cast, then folded into plain kernels.
  flat.update({p: jax.ShapeDtypeStruct(s, dtypes[p]) for p, s in adapters.items()})
  loaded = checkpoint.load_params(directory, paths.unflatten(flat), key=key, step=step, **kwargs)
  return tuners.merge(loaded)
