"""Pretrained VGG weights from other frameworks -> `ftlab.models.vgg` variables.

One module per format, each with `read(path, arch=None) -> Ported`:

  keras_h5      Keras VGG16/VGG19: legacy `.h5` (keras-applications files, `model.save`),
                Keras 3 `.weights.h5` and `.keras` archives
  torchvision   torchvision VGG11-19 and `_bn` state dicts, `.pth` or `.safetensors`
  timm          timm VGG state dicts (conv `pre_logits` head), `.safetensors` or `.pth`
  onnx          ONNX VGG graphs, mapped by graph structure (`onnx_graph`)

Files hold more than a VGG: a trainer's checkpoint dict around the state dict, DataParallel's
`module.` in the names, a VGG backbone under a prefix of a larger model, a Keras transfer
model with its own head, an ONNX graph with a custom head. Each format finds the VGG inside
(`torchvision.locate`, `keras_h5.locate`, `onnx_walk.walk`), ports it, and says in
`Ported.report()` what was ported from where and what was left out.

`load(path)` tells the format from the file, the architecture from its tensors, and returns
`(model, variables, preprocess)` such that

  model.apply(variables, preprocess(images_uint8_BHWC), train=False)

gives the source model's logits (its block-5 feature map, NHWC, for a headless file). Ports
are strict within the VGG: a tensor missing, left over or of another shape is an error that
counts and lists them; so are inf and NaN values, unless `allow_nonfinite`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import numpy as np

from ftlab.data import preprocessing
from ftlab.models import vgg
from ftlab.porting import export, keras_h5, onnx_graph, tensor_files, timm, torchvision
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
PREPROCESSING = preprocessing.CONVENTIONS


def detect_format(path: str | os.PathLike) -> str:
  """The format of a weight file, from its content (and the `.onnx` suffix).

  Raises:
    PortError: the file is missing or of no known format.
  """
  if not os.path.isfile(path):
    raise PortError(f'no such file: {path}')
  # By content first, name last: weight files are often renamed (`best.pt`, `model.bin`), but
  # their first bytes say what they are. Only ONNX (a bare protobuf) has no signature.
  if keras_h5.is_hdf5(path) or keras_h5.is_keras_archive(path):
    return 'keras_h5'
  if tensor_files.kind(path):
    # torchvision and timm share `features.*`; timm's head has other names.
    return 'timm' if timm.is_timm(tensor_files.names(path)) else 'torchvision'
  if os.fspath(path).endswith('.onnx'):
    return 'onnx'
  raise PortError(
    f'cannot tell the format of {path}: not HDF5 or .keras (Keras), torch.save or '
    f'.safetensors, and not named .onnx; ftlab reads {", ".join(FORMATS)} files'
  )


def read(
  path: str | os.PathLike,
  format: str | None = None,
  arch: str | None = None,
  preprocess: str | None = None,
  *,
  prefix: str | None = None,
  allow_nonfinite: bool = False,
) -> Ported:
  """Ports a weight file, keeping what was found (format, arch, where, notes) for the record.

  Args:
    path: the weight file.
    format: one of `FORMATS`; None to detect it (`detect_format`).
    arch: `vgg11` ... `vgg19_bn` to require that layout; None to infer it from the file.
      Width, head and class count always come from the tensors' shapes.
    preprocess: `caffe`, `torch` or `unit` to override the format's convention (ONNX graphs
      do not say which they were trained with).
    prefix: where a file holds several VGGs (a model and its EMA copy), the name prefix of
      the one to port (`state_dict_ema`, a Keras model name); None takes the best one.
    allow_nonfinite: port inf and NaN values instead of refusing them.

  Raises:
    PortError: an unknown format, arch or preprocessing, an unreadable file, no VGG in it,
      weights that do not match the arch, or non-finite values.
  """
  if not os.path.isfile(path):
    raise PortError(f'no such file: {path}')
  if format is not None and format not in FORMATS:
    raise PortError(f'unknown format {format!r}; valid: {", ".join(FORMATS)}')
  if preprocess is not None and preprocess not in PREPROCESSING:
    raise PortError(f'unknown preprocessing {preprocess!r}; valid: {", ".join(PREPROCESSING)}')
  if format in (None, 'torchvision', 'timm') and tensor_files.kind(path):
    # One read: the head's names tell torchvision from timm, and a .pth has no cheap header.
    located = torchvision.locate(
      tensor_files.read(path).tensors, prefix=prefix, source=os.fspath(path)
    )
    format = format or ('timm' if timm.is_timm(list(located.tensors)) else 'torchvision')
    module = timm if format == 'timm' else torchvision
    ported = module.from_tensors(
      located.tensors,
      arch,
      source=os.fspath(path),
      names=located.names,
      allow_nonfinite=allow_nonfinite,
    )
    ported = dataclasses.replace(
      ported,
      notes=ported.notes + located.notes,
      found_at=located.found_at,
      left_out=located.left_out,
    )
  else:
    format = format or detect_format(path)
    if format == 'onnx':
      ported = onnx_graph.read(path, arch, preprocess, allow_nonfinite=allow_nonfinite)
    elif format == 'keras_h5':
      ported = keras_h5.read(path, arch, prefix=prefix, allow_nonfinite=allow_nonfinite)
    else:
      raise PortError(f'{path} is not a torch.save or .safetensors file (format={format!r})')
  # What ftlab's own export recorded beside the file: the run's input convention, which a
  # weight file cannot hold, read back rather than guessed from the format.
  provenance = export.read_provenance(path)
  if provenance is not None:
    recorded = provenance.get('preprocessing')
    ported = dataclasses.replace(
      ported,
      preprocessing=Preprocessing(recorded) if recorded else ported.preprocessing,
      notes=ported.notes
      + (f'input convention and classes recorded by ftlab: {export.provenance_path(path)}',),
      provenance=provenance,
    )
  # The caller's convention replaces the format's (or a guess) and is recorded as given, not
  # as a guess.
  if preprocess:
    ported = dataclasses.replace(ported, preprocessing=Preprocessing(preprocess))
  return ported


def load(
  path: str | os.PathLike,
  format: str | None = None,
  arch: str | None = None,
  preprocess: str | None = None,
  **kwargs,
) -> tuple[vgg.VGG, dict, Callable[[np.ndarray], np.ndarray]]:
  """`(model, variables, preprocess)` for a weight file; see `read` for the arguments.

  `preprocess` maps uint8 RGB images `[B, H, W, 3]` to the model's float32 input; its `.name`
  (`caffe`, `torch` or `unit`) is the value for `config.dataset.preprocess`.
  """
  ported = read(path, format, arch, preprocess, **kwargs)
  return ported.arch.model(), ported.variables, ported.preprocessing
