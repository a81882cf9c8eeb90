"""Reading a finished run's files in tests: its checkpointed parameters."""

import os

import jax
import numpy as np

from configs import default
from ftlab import checkpoint, loop, policies


def params_of(workdir, width=1 / 16, num_classes=10, step=None, model='vgg11'):
  """The flat parameters of a `configs/default.py:runlocal` run (newest or `step`)."""
  config = default.get_config('runlocal')
  config.model.name = model
  config.model.width = width
  model = loop.build_model(config.model, num_classes=num_classes)
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), np.zeros((1, 32, 32, 3)), train=False)
  )['params']
  fresh = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  return policies.flatten(checkpoint.load_params(ckpt_dir, fresh, step=step))
