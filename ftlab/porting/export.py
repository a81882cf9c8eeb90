"""ftlab variables -> the files other frameworks load: weights back out of a fine-tuned run.

  torchvision   a `.pth` state dict in torchvision's VGG layout (`features.*`, `classifier.*`,
                BatchNorm's `num_batches_tracked` included), for `torchvision.models.vgg16()`
                and friends (`load_state_dict`, strict)
  safetensors   the same tensors as a `.safetensors` file (no pickle; timm and torch read it)
  keras_h5      Keras' legacy HDF5 weights layout (`layer_names`, `weight_names`), the layout of
                the keras-applications files: `model.load_weights(path)` of a Keras VGG with
                the same layer names

The tables are the ports' rules run backwards (`Layout.from_flax`), so an export ports back to
the same variables (`ftlab.porting.read`), and a torchvision export gives ftlab's logits in a
torch implementation of torchvision's VGG.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from ftlab import paths
from ftlab.models import vgg
from ftlab.porting import common, keras_h5, torchvision
from ftlab.porting.common import PortError

FORMATS = ('torchvision', 'safetensors', 'keras_h5')
TORCHVISION_POOL = 7  # torchvision's AdaptiveAvgPool2d((7, 7)) before the classifier
KERAS_SIDE = 7  # Keras' include_top VGGs: 224-pixel inputs, a 7x7 block-5 map flattened


def _pooled_side(model: vgg.VGG, image_size: int) -> int:
  """The side of the map the first dense layer of an `imagenet` head reads."""
  # Without an adaptive pool, five 2x2 pools leave image_size / 32 on a side.
  return model.adaptive_pool or image_size // vgg.MIN_INPUT_SIZE


def _convert(rules: list[common.Rule], variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  flat = paths.flatten(dict(variables))
  return {
    r.source: np.ascontiguousarray(r.layout.from_flax(np.asarray(flat[r.target], np.float32)))
    for r in rules
  }


def torchvision_state_dict(
  variables: Mapping[str, Any], model: vgg.VGG, image_size: int
) -> dict[str, np.ndarray]:
  """torchvision's `state_dict()` of the model, as numpy arrays.

  Args:
    variables: `{'params': ..., 'batch_stats': ...}` of `model`.
    model: the VGG; its head must be torchvision's (`imagenet`, reading a 7x7 map) or none.
    image_size: the side of the images the model runs on (for a head without adaptive pool).

  Raises:
    PortError: a head torchvision's VGG does not have (gap, mlp), or an imagenet head that
      does not read a 7x7 block-5 map.
  """
  if model.head not in ('imagenet', 'none'):
    raise PortError(
      f'torchvision VGGs have the imagenet head (or none, features only); this model has the '
      f'{model.head!r} head: export keras_h5 (gap, imagenet, none) instead'
    )
  side = _pooled_side(model, image_size)
  if model.head == 'imagenet' and side != TORCHVISION_POOL:
    raise PortError(
      f"torchvision's classifier reads a 7x7 block-5 map; this model's fc1 reads {side}x{side} "
      '(adaptive_pool and image_size); train with --config.model.adaptive_pool=7 to export it'
    )
  arch = common.Arch.of(model)
  rules = torchvision.feature_rules(model.depth, model.batch_norm)
  rules += torchvision.classifier_rules(arch)
  tensors = _convert(rules, variables)
  if model.batch_norm:  # torchvision's strict load_state_dict wants the BatchNorm step counter
    for index, _ in torchvision.feature_indices(model.depth, True):
      tensors[f'features.{index + 1}.num_batches_tracked'] = np.zeros((), np.int64)
  return tensors


def keras_tensors(
  variables: Mapping[str, Any], model: vgg.VGG, image_size: int
) -> dict[str, np.ndarray]:
  """`{'block1_conv1/kernel': array, ...}` in Keras' layouts (the same as Flax's).

  Raises:
    PortError: BatchNorm (Keras' VGGs have none), the mlp head, or an imagenet head whose
      fc1 does not read Keras' unpooled 7x7 flatten (224-pixel images).
  """
  if model.batch_norm:
    raise PortError('Keras VGGs have no BatchNorm: export a _bn model as torchvision')
  if model.head == 'mlp':
    raise PortError("Keras' VGG heads are imagenet, gap or none; this model's is mlp")
  side = image_size // vgg.MIN_INPUT_SIZE
  # At 224 pixels an adaptive pool to 7 is the identity, so such a model is Keras' too.
  if model.head == 'imagenet' and (side != KERAS_SIDE or model.adaptive_pool not in (0, side)):
    raise PortError(
      "Keras' imagenet head flattens the unpooled 7x7 block-5 map of 224-pixel images; this "
      f'model reads {image_size}-pixel images, pooled to {_pooled_side(model, image_size)}x'
      f'{_pooled_side(model, image_size)}: export it as torchvision (with adaptive_pool=7), '
      'or use the gap head'
    )
  rules = keras_h5.rules(common.Arch.of(model))
  return _convert(rules, variables)


def save(
  variables: Mapping[str, Any],
  model: vgg.VGG,
  format: str,
  path: str,
  *,
  image_size: int,
  provenance: Mapping[str, Any] | None = None,
) -> None:
  """Writes the model's variables to `path` in `format` (one of `FORMATS`), and `provenance`
  beside it (`provenance_path(path)`), which `ftlab.porting.read` reads back.

  Args:
    variables: the model's `{'params', 'batch_stats'}` (plain: a tuner's adapters folded).
    model: the model.
    format: one of `FORMATS`.
    path: the file to write.
    image_size: the run's input side, pixels (fixes the first dense layer's layout).
    provenance: what a weight file cannot say: `preprocessing` (the input convention the
      run was trained on: `caffe`, `torch` or `unit`), `classes` (names, in label order),
      the run and step it came from. None: nothing is written beside the file.

  Raises:
    PortError: an unknown format, or a model the format cannot hold (see above).
  """
  if format not in FORMATS:
    raise PortError(f'unknown export format {format!r}; valid: {", ".join(FORMATS)}')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if format == 'keras_h5':
    _write_keras_h5(keras_tensors(variables, model, image_size), path)
  else:
    tensors = torchvision_state_dict(variables, model, image_size)
    if format == 'safetensors':
      from safetensors.numpy import save_file

      save_file(tensors, path)
    else:
      import torch

      # `np.array` copies into a writable array: `torch.from_numpy` shares memory and warns
      # about read-only buffers.
      torch.save({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, path)
  if provenance is not None:
    # Beside the file, not in it: torchvision's strict `load_state_dict` refuses any key that
    # is not a tensor of the model, and every format's reader then loads the file as it is.
    record = {'format': PROVENANCE_FORMAT, 'export_format': format, **provenance}
    with open(provenance_path(path), 'w') as f:
      json.dump(record, f, indent=2)


PROVENANCE_FORMAT = 'ftlab-export-provenance-1'


def provenance_path(path: str) -> str:
  """Where `save` writes what the weight file cannot hold: `PATH.ftlab.json`."""
  return f'{os.fspath(path)}.ftlab.json'


def read_provenance(path: str) -> dict | None:
  """The provenance `save` wrote beside the weight file `path`, or None.

  Raises:
    PortError: a file at `provenance_path(path)` that is not ftlab's provenance record.
  """
  found = provenance_path(path)
  if not os.path.exists(found):
    return None
  try:
    with open(found) as f:
      record = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise PortError(f'{found}: not a readable provenance record ({e})') from None
  if not isinstance(record, dict) or record.get('format') != PROVENANCE_FORMAT:
    raise PortError(f'{found}: not an ftlab export provenance record ({PROVENANCE_FORMAT})')
  return record


def _write_keras_h5(tensors: Mapping[str, np.ndarray], path: str) -> None:
  """Keras' legacy weights layout: what `legacy_h5_format.save_weights_to_hdf5_group` writes."""
  import h5py

  layers = list(dict.fromkeys(paths.layer_of(name) for name in tensors))
  with h5py.File(path, 'w') as f:
    f.attrs['layer_names'] = np.array([n.encode() for n in layers])
    f.attrs['backend'] = b'tensorflow'
    f.attrs['keras_version'] = b'ftlab export'
    for layer in layers:
      group = f.create_group(layer)
      # Keras 2's names, with the ':0' TensorFlow suffix; the '/' makes h5py nest a subgroup per
      # layer inside the layer's group, as Keras' own files do.
      names = [f'{layer}/kernel:0', f'{layer}/bias:0']
      group.attrs['weight_names'] = np.array([n.encode() for n in names])
      for name, key in zip(names, ('kernel', 'bias')):
        group.create_dataset(name, data=tensors[f'{layer}/{key}'])
