"""Starting a run from another run's or a port's weights: strict, with the fix for a mismatch.

`variables` initialises a model, then loads the checkpoint `config.init` names into it: every
parameter found and of its shape, except those a `dont_load` regex keeps fresh (a new head),
and no inf or NaN. A checkpoint that does not fit says why and which flags fix it
(`mismatch_advice`): another VGG (name, width, head), another class count (a fresh head), or
an fc1 built for another image size (the image size or an adaptive pool, not `dont_load`,
which would throw the pretrained layer away).
"""

from __future__ import annotations

import functools
import math
import os
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftlab import checkpoint, paths
from ftlab.models import vgg

PyTree = Any


class InitError(ValueError):
  """The init checkpoint is missing, does not fit the model, or holds inf/NaN (one line)."""


def variables(model: nn.Module, image_size: int, rng: jax.Array, init_cfg: Any) -> PyTree:
  """Fresh variables, then (if `init_cfg.checkpoint`) the checkpoint's, strictly checked.

  Parameters matching an `init_cfg.dont_load` regex keep their fresh values (a new head).

  Raises:
    InitError: the checkpoint is missing, does not fit the model (the message says the
      likely cause and the flags that fix it) or holds inf/NaN (unless
      `init_cfg.allow_nonfinite`).
  """
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  fresh = jax.jit(functools.partial(model.init, train=False))(rng, x)
  if not init_cfg.checkpoint:
    return fresh
  dont_load = tuple(init_cfg.dont_load)
  source = init_cfg.checkpoint
  if os.path.isdir(os.path.join(source, 'checkpoints')):  # a run's workdir
    source = os.path.join(source, 'checkpoints')
  allow_nonfinite = bool(init_cfg.get('allow_nonfinite', False))
  load = functools.partial(checkpoint.load_params, source, allow_nonfinite=allow_nonfinite)
  try:
    loaded = {'params': load(fresh['params'], dont_load=dont_load)}
    if 'batch_stats' in fresh:
      # The same patterns, less those that name no statistics (a dense head has none).
      stats_paths = paths.flatten(fresh['batch_stats'])
      stats_dont_load = [p for p in dont_load if any(re.fullmatch(p, q) for q in stats_paths)]
      loaded['batch_stats'] = load(
        fresh['batch_stats'], dont_load=stats_dont_load, key='batch_stats'
      )
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
  if error.unused_dont_load:
    layers = sorted({p.split('/')[0] for p in error.expected})
    return f'Paths are layer/name (e.g. predictions/kernel); the layers: {", ".join(layers)}'
  want, have = vgg.architecture_of(error.expected), vgg.architecture_of(error.found)
  fixes = []
  if have['name'] and have['name'] != want['name']:
    fixes.append(f'--config.model.name={have["name"]}')
  if have['width'] and want['width'] and not np.isclose(have['width'], want['width']):
    fixes.append(f'--config.model.width={have["width"]:g}')
  if have['head'] != want['head'] and have['head'] != 'none':
    fixes.append(f'--config.model.head={have["head"]}')
  if fixes:
    found = f'a {have["name"] or "VGG"} (width {have["width"]:g}, {have["head"]} head)'
    return f'Likely cause: the checkpoint is {found}, another model: {" ".join(fixes)}'
  advice = []
  layers = lambda names: {p.split('/')[0] for p in names}
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
    built = math.isqrt(error.found[first_dense][0] // channels)
    now = math.isqrt(error.expected[first_dense][0] // channels)
    layer = first_dense.split('/')[0]
    advice.append(
      f'{layer} was built for a {built}x{built}x{channels} block-5 map ({built * 32} px images '
      f'without pooling), and this model gives it {now}x{now} at image_size {image_size}: keep '
      f'the pretrained {layer} with --config.dataset.image_size={built * 32}, or with '
      f'--config.model.adaptive_pool={built} (average-pools block 5 to {built}x{built} at any '
      'image size, as torchvision does)'
    )
  return ('Likely cause: ' + '; and '.join(advice)) if advice else ''
