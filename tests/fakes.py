"""Shared fakes for the tests: a narrow VGG, random image batches, random variables.

Variables are drawn with numpy from `jax.eval_shape`: nothing to compile (jitting a VGG init on
the 8 fake CPU devices takes seconds), and BatchNorm statistics far from init's zeros and ones,
so a frozen BatchNorm layer is no identity.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ftlab import paths
from ftlab.models import vgg

# Why a module that needs torch skips: its CPU wheel lies on these machines' disks for Python
# 3.11 only (setup.cfg asks for it there); elsewhere pip would fetch a CUDA build of several GB.
NO_TORCH = 'torch is not installed (its CPU wheel is installed on Python 3.11 only; see setup.cfg)'


def tiny_vgg(batch_norm=False, head='gap', num_classes=5, width=1 / 16, **kw):
  """A VGG11 narrow enough for a CPU test (4 to 32 channels at width 1/16)."""
  return vgg.VGG(
    depth=11, batch_norm=batch_norm, num_classes=num_classes, head=head, width=width, **kw
  )


def image_batches(n, batch_size=16, seed=0, num_classes=5, padding=None):
  """`n` batches of normal images (32 px) and random labels; with `padding`, a `'mask'` whose
  last `padding` entries are 0."""
  rng = np.random.RandomState(seed)
  out = []
  for _ in range(n):
    batch = {
      'image': rng.normal(size=(batch_size, 32, 32, 3)).astype(np.float32) * 2 + 0.5,
      'label': rng.randint(0, num_classes, batch_size).astype(np.int32),
    }
    if padding is not None:
      batch['mask'] = np.ones(batch_size, np.float32)
      batch['mask'][batch_size - padding :] = 0
    out.append(batch)
  return out


def shapes(model, size=32):
  """The model's variables as `jax.ShapeDtypeStruct`s."""
  init = functools.partial(model.init, train=False)
  return jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, size, size, 3)))


def random_variables(model, seed=0, size=32):
  """He-scaled kernels, small random biases and shifts, BatchNorm scales and statistics
  around one (variances in [0.5, 1.5]) and means around zero."""
  rng = np.random.RandomState(seed)

  def draw(key_path, x):
    name = paths.from_key_path(key_path)
    if name.endswith('kernel'):
      value = rng.normal(size=x.shape) * np.sqrt(2 / np.prod(x.shape[:-1]))
    elif name.endswith('scale'):
      value = 1 + 0.1 * rng.normal(size=x.shape)
    elif name.endswith('var'):
      value = rng.uniform(0.5, 1.5, x.shape)
    else:  # biases, BatchNorm shifts and means
      value = 0.1 * rng.normal(size=x.shape)
    return value.astype(x.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes(model, size))
