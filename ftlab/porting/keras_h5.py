"""Keras VGG16/VGG19 weights in the legacy HDF5 layout (keras-applications files).

`vgg16_weights_tf_dim_ordering_tf_kernels[_notop].h5` and the files Keras writes with
`legacy_h5_format.save_weights_to_hdf5_group` (or `model.save('x.h5')`, under
`model_weights/`) hold:

  attrs['layer_names']                 every layer, in model order
  <layer>/attrs['weight_names']        its weights, in Keras' legacy order (kernel, bias)
  <layer>/<weight name>                the arrays

Weight names differ between Keras versions (`block1_conv1_W_1:0`, `block1_conv1/kernel:0`,
`block1_conv1/kernel`), so weights are taken by position, as Keras itself loads them. Layer
names are Keras' (`block1_conv1` ... `fc1`, `fc2`, `predictions`), the same as ftlab's, and
conv kernels (HWIO) and dense kernels (in, out) are Flax's layouts: the port is a table.
Keras flattens the 7x7 block-5 map without pooling, so the ported model (`adaptive_pool=0`)
takes 224x224 images with the top, any size >= 32 without; Keras' preprocessing is `caffe`.
"""

from __future__ import annotations

import os
import re

import numpy as np

from ftlab.models import vgg
from ftlab.porting import common
from ftlab.porting.common import PortError

HDF5_SIGNATURE = b'\x89HDF\r\n\x1a\n'
CONV = re.compile(r'block(\d)_conv(\d)')
DENSE_LAYERS = ('fc1', 'fc2', 'predictions')


def is_hdf5(path: str | os.PathLike) -> bool:
  with open(path, 'rb') as f:
    return f.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE


def _attribute(group, name: str) -> list[str]:
  # Long lists are split into `name0`, `name1`, ... (HDF5's attribute size limit).
  if name in group.attrs:
    values = list(group.attrs[name])
  else:
    values, chunk = [], 0
    while f'{name}{chunk}' in group.attrs:
      values += list(group.attrs[f'{name}{chunk}'])
      chunk += 1
  return [v.decode('utf8') if isinstance(v, bytes) else str(v) for v in values]


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """`{'block1_conv1/kernel': array, ...}` of a legacy Keras HDF5 weights file.

  A layer with a kernel and a bias gives `<layer>/kernel` and `<layer>/bias`; any other
  layer's weights keep their stored names (and will be reported as unexpected).

  Raises:
    PortError: not readable as HDF5, or not in the legacy Keras layout.
  """
  import h5py

  try:
    with h5py.File(path, 'r') as f:
      group = f['model_weights'] if 'model_weights' in f else f
      layers = _attribute(group, 'layer_names')
      if not layers:
        raise PortError(
          f'{path} is HDF5 but not a legacy Keras weights file (no layer_names attribute; '
          'a Keras 3 .weights.h5? Save with model.save("x.h5") or save_weights_to_hdf5_group)'
        )
      tensors = {}
      for layer in layers:
        names = _attribute(group[layer], 'weight_names')
        arrays = [np.asarray(group[layer][name]) for name in names]
        tensors.update(_named(layer, names, arrays))
      return tensors
  except PortError:
    raise
  except (OSError, KeyError, ValueError, RuntimeError) as e:
    # h5py's errors for a truncated or damaged file surface here, not deep in a caller.
    raise PortError(
      f'cannot read {path} as a Keras HDF5 file (truncated or damaged?): {e}'
    ) from None


def _named(layer: str, names: list[str], arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
  if len(arrays) == 2 and arrays[0].ndim >= 2 and arrays[1].ndim == 1:
    return {f'{layer}/kernel': arrays[0], f'{layer}/bias': arrays[1]}
  return {f'{layer}/{name}': array for name, array in zip(names, arrays)}


def infer_depth(tensors: dict[str, np.ndarray]) -> tuple[tuple[int, bool] | None, tuple]:
  """((depth, False) or None, convs per block found), from the conv layer names."""
  counts = [0] * len(vgg.BLOCK_CHANNELS)
  for name in tensors:
    m = CONV.fullmatch(name.split('/')[0])
    if m and 1 <= int(m.group(1)) <= len(counts):
      block = int(m.group(1)) - 1
      counts[block] = max(counts[block], int(m.group(2)))
  depth = common.depth_of(counts)
  return ((depth, False) if depth else None), tuple(counts)


def rules(arch: common.Arch) -> list[common.Rule]:
  """Same names and layouts on both sides: `<layer>/kernel|bias` -> `params/<layer>/...`."""
  layers = [layer for _, layer in common.conv_layers(arch.depth)]
  if arch.head == 'imagenet':
    layers += DENSE_LAYERS
  return [common.Rule(f'{n}/{w}', f'params/{n}/{w}') for n in layers for w in ('kernel', 'bias')]


def read(path: str | os.PathLike, arch: str | None = None) -> common.Ported:
  """Ports a legacy Keras VGG HDF5 file, with or without the top.

  Args:
    path: the `.h5` file.
    arch: `vgg16`, `vgg19`, ... to require that layout; None to infer it from the layer
      names. Keras VGGs have no BatchNorm.

  Raises:
    PortError: unreadable file, unknown layout, or tensors that do not match the arch (one
      message lists every missing, unexpected and mis-shaped weight).
  """
  tensors = read_tensors(path)
  found, counts = infer_depth(tensors)
  depth, batch_norm = common.choose_depth(
    found, arch, f'{path} has {counts} block{{b}}_conv{{i}} layers per block'
  )
  if batch_norm:
    raise PortError(f'{path}: Keras VGG files have no BatchNorm; use arch={f"vgg{depth}"!r}')
  first = tensors.get('block1_conv1/kernel')
  predictions = tensors.get('predictions/bias')
  headless = not any(n.split('/')[0] in DENSE_LAYERS for n in tensors)
  ported_arch = common.Arch(
    depth=depth,
    head='none' if headless else 'imagenet',
    width=common.width_of(first.shape[-1]) if first is not None and first.ndim == 4 else 1.0,
    num_classes=predictions.shape[0] if predictions is not None else 1000,
  )
  variables = common.assemble(tensors, rules(ported_arch), ported_arch, source=os.fspath(path))
  return common.Ported('keras_h5', ported_arch, variables, common.Preprocessing('caffe'))
