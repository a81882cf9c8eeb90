"""Pretrained VGG weights from other frameworks -> `ftlab.models.vgg` variables.

One module per format, each with `read(path, arch=None) -> Ported`:

  keras_h5      Keras VGG16/VGG19 `.h5` in the legacy layout (keras-applications files)
  torchvision   torchvision VGG11-19 and `_bn` state dicts, `.pth` or `.safetensors`
  timm          timm VGG state dicts (conv `pre_logits` head), `.safetensors` or `.pth`
  onnx          ONNX VGG graphs, mapped by graph structure (`onnx_graph`)

`load(path)` tells the format from the file, the architecture from its tensors, and returns
`(model, variables, preprocess)` such that

  model.apply(variables, preprocess(images_uint8_BHWC), train=False)

gives the source model's logits (its block-5 feature map, NHWC, for a headless file). Ports
are strict: a tensor missing, left over or of another shape is an error naming all of them.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import numpy as np

from ftlab.models import vgg
from ftlab.porting import keras_h5, onnx_graph, tensor_files, timm, torchvision
from ftlab.porting.common import Arch, Ported, PortError, Preprocessing, param_count

__all__ = [
  'Arch',
  'FORMATS',
  'PortError',
  'Ported',
  'Preprocessing',
  'detect_format',
  'load',
  'param_count',
  'read',
]

FORMATS = ('keras_h5', 'torchvision', 'timm', 'onnx')
PREPROCESSING = ('caffe', 'torch')


def detect_format(path: str | os.PathLike) -> str:
  """The format of a weight file, from its content (and the `.onnx` suffix).

  Raises:
    PortError: the file is missing or of no known format.
  """
  if not os.path.isfile(path):
    raise PortError(f'no such file: {path}')
  if keras_h5.is_hdf5(path):
    return 'keras_h5'
  if tensor_files.kind(path):
    # torchvision and timm share `features.*`; timm's head has other names.
    return 'timm' if timm.is_timm(tensor_files.names(path)) else 'torchvision'
  if os.fspath(path).endswith('.onnx'):
    return 'onnx'
  raise PortError(
    f'cannot tell the format of {path}: not HDF5 (Keras), torch.save or .safetensors, and not '
    f'named .onnx; pass format= (one of {", ".join(FORMATS)})'
  )


def read(
  path: str | os.PathLike,
  format: str | None = None,
  arch: str | None = None,
  preprocess: str | None = None,
) -> Ported:
  """Ports a weight file, keeping what was found (format, arch, notes) for the record.

  Args:
    path: the weight file.
    format: one of `FORMATS`; None to detect it (`detect_format`).
    arch: `vgg11` ... `vgg19_bn` to require that layout; None to infer it from the file.
      Width, head and class count always come from the tensors' shapes.
    preprocess: `caffe` or `torch` to override the format's convention (ONNX graphs do not
      say which they were trained with).

  Raises:
    PortError: an unknown format, arch or preprocessing, an unreadable file, or weights that
      do not match the arch.
  """
  if not os.path.isfile(path):
    raise PortError(f'no such file: {path}')
  if format is not None and format not in FORMATS:
    raise PortError(f'unknown format {format!r}; valid: {", ".join(FORMATS)}')
  if preprocess is not None and preprocess not in PREPROCESSING:
    raise PortError(f'unknown preprocessing {preprocess!r}; valid: {", ".join(PREPROCESSING)}')
  tensors = None
  if format is None and tensor_files.kind(path):
    # Read once: the names tell torchvision from timm, and a .pth has no cheap header.
    tensors = tensor_files.read(path)
    format = 'timm' if timm.is_timm(list(tensors)) else 'torchvision'
  format = format or detect_format(path)
  if format == 'onnx':
    return onnx_graph.read(path, arch, preprocess)
  if format == 'keras_h5':
    ported = keras_h5.read(path, arch)
  else:
    tensors = tensor_files.read(path) if tensors is None else tensors
    module = timm if format == 'timm' else torchvision
    ported = module.from_tensors(tensors, arch, source=os.fspath(path))
  if preprocess:
    ported = dataclasses.replace(ported, preprocessing=Preprocessing(preprocess))
  return ported


def load(
  path: str | os.PathLike,
  format: str | None = None,
  arch: str | None = None,
  preprocess: str | None = None,
) -> tuple[vgg.VGG, dict, Callable[[np.ndarray], np.ndarray]]:
  """`(model, variables, preprocess)` for a weight file; see `read` for the arguments.

  `preprocess` maps uint8 RGB images `[B, H, W, 3]` to the model's float32 input; its `.name`
  (`caffe` or `torch`) is the value for `config.dataset.preprocess`.
  """
  ported = read(path, format, arch, preprocess)
  return ported.arch.model(), ported.variables, ported.preprocessing
