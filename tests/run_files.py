"""Reading a finished run's files in tests: its checkpointed parameters."""

import json
import os

import jax
import ml_collections
import numpy as np

from configs import default
from ftlab import paths, run
from ftlab.files import checkpoint


def plain_vgg11(config):
  """`config` on a plain VGG11 with the mlp head: the model whose layers a test counts (the
  runlocal smoke run trains VGG11-BN with a pooled head, which learns in 20 steps)."""
  config.model.name, config.model.head = 'vgg11', 'mlp'
  return config


def stepwise_config(policy, steps=8):
  """runlocal on the plain VGG11 under `policy` for `steps` steps, a checkpoint after every
  step (all kept) and one eval and log at the end: for tests that read the run step by step."""
  config = plain_vgg11(default.get_config('runlocal'))
  config.policy.name = policy
  config.num_train_steps = steps
  config.checkpoint_every_steps = 1
  config.keep_checkpoints = 100
  config.eval_every_steps = steps
  config.log_every_steps = steps
  return config


def params_of(workdir, num_classes=10, step=None, model=None):
  """The flat parameters of a run (newest checkpoint or `step`), for the model its
  `config.json` records (`model` names another VGG)."""
  with open(os.path.join(workdir, 'config.json')) as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.model.name = model or config.model.name
  model = run.build_model(config.model, num_classes=num_classes)
  size = config.dataset.image_size
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), np.zeros((1, size, size, 3)), train=False)
  )['params']
  fresh = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  return paths.flatten(checkpoint.load_params(ckpt_dir, fresh, step=step))
