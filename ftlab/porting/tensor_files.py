"""Named-tensor files (torch `.pth` and `.safetensors`) -> `{name: numpy array}`.

`.safetensors` needs only the `safetensors` package. `.pth` files are pickles, which can run
code when loaded: they are read with `torch.load(..., weights_only=True)`, which unpickles
tensors and plain containers only and refuses anything else, and torch is imported only
when such a file is read.

A `.pth` is often more than a state dict: trainers wrap it with metadata (`epoch`, `arch`, a
`best_acc1` tensor), optimizer state and EMA copies. `read` returns every tensor in the file,
nested containers joined with '.' (`state_dict.module.features.0.weight`,
`optimizer.state.0.momentum_buffer`), and the top level's other values as metadata; the
format modules find the VGG among them (`torchvision.locate`).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import zipfile
from typing import Any

import numpy as np

from ftlab.porting.common import PortError


@dataclasses.dataclass(frozen=True)
class TensorFile:
  """What a tensor file holds.

  Attributes:
    tensors: every tensor, by its '.'-joined path in the file, as a numpy array (bfloat16
      as float32, which holds every bfloat16 and float16 value).
    metadata: the top level's values that are not tensors nor containers (`epoch`, `arch`).
  """

  tensors: dict[str, np.ndarray]
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


def kind(path: str | os.PathLike) -> str | None:
  """`safetensors`, `pth` or None, from the file's first bytes (not its name)."""
  with open(path, 'rb') as f:
    head = f.read(9)
  # safetensors: an 8-byte little-endian header length, then the JSON header.
  if len(head) == 9 and head[8:9] == b'{':
    return 'safetensors'
  # torch.save: a zip archive with `<name>/data.pkl` (torch >= 1.6), or a bare pickle.
  if head.startswith(b'PK\x03\x04'):
    try:
      with zipfile.ZipFile(path) as z:
        names = z.namelist()
    except zipfile.BadZipFile:
      return 'pth'  # damaged: let torch report it
    # Any other zip (a `.keras` archive, a dataset) is not a torch file.
    return 'pth' if any(n.endswith('/data.pkl') for n in names) else None
  if head.startswith(b'\x80'):
    return 'pth'
  return None


def read(path: str | os.PathLike) -> TensorFile:
  """Every tensor of a `.safetensors` or `.pth` file, and the top level's metadata.

  Raises:
    PortError: the file is neither, is damaged, holds pickled code or other objects, or is a
      `.pth` and torch is not installed.
  """
  found = kind(path)
  if found == 'safetensors':
    return TensorFile(_read_safetensors(path))
  if found == 'pth':
    return _read_pth(path)
  raise PortError(f'{path} is neither a .safetensors file nor a torch.save file')


def names(path: str | os.PathLike) -> list[str]:
  """The tensor names in the file (cheap for `.safetensors`: only the header is read)."""
  if kind(path) == 'safetensors':
    try:
      from safetensors import safe_open

      with safe_open(os.fspath(path), framework='numpy') as f:
        return list(f.keys())
    except Exception as e:  # safetensors raises its own error types for damaged headers
      raise PortError(f'cannot read {path} as .safetensors: {e}') from None
  return list(read(path).tensors)


def _read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  try:
    from safetensors.numpy import load_file
  except ImportError:
    raise PortError(f'reading {path} needs the safetensors package (pip install safetensors)')
  try:
    return dict(load_file(os.fspath(path)))
  except Exception as e:  # SafetensorError for a truncated or malformed file
    raise PortError(f'cannot read {path} as .safetensors (truncated or damaged?): {e}') from None


def _read_pth(path: str | os.PathLike) -> TensorFile:
  try:
    import torch
  except ImportError:
    raise PortError(
      f'reading {path} (a torch pickle) needs torch; install it, or convert the file to '
      '.safetensors where torch is installed'
    ) from None
  try:
    # `map_location='cpu'`: a file saved from GPU tensors loads on a machine without CUDA.
    loaded = torch.load(os.fspath(path), map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    # weights_only refused a global: the file holds objects other than tensors, maybe code.
    refused = str(e).strip().splitlines()
    detail = next((line for line in refused if 'GLOBAL' in line), refused[-1] if refused else '')
    raise PortError(
      f'{path} holds pickled Python objects other than tensors, which could run code when '
      f'loaded; refused ({detail.strip()}). Re-save its state_dict (or as .safetensors) from '
      'a trusted environment'
    ) from None
  except Exception as e:  # RuntimeError for a damaged zip, EOFError for a cut pickle, ...
    raise PortError(f'cannot read {path} as a torch file (truncated or damaged?): {e}') from None
  tensors = {}
  _flatten(loaded, '', tensors)
  if not tensors:
    raise PortError(f'{path} holds no tensors (a {type(loaded).__name__})')
  metadata = {}
  if isinstance(loaded, dict):
    metadata = {str(k): v for k, v in loaded.items() if isinstance(v, (int, float, str, bool))}
  return TensorFile(tensors, metadata)


def _flatten(value: Any, name: str, into: dict[str, np.ndarray]) -> None:
  """Tensors anywhere in nested dicts, lists and tuples, by '.'-joined path."""
  import torch

  if isinstance(value, torch.Tensor):
    value = value.detach()
    # bfloat16 has no numpy dtype; float32 keeps every value of it and of float16.
    into[name] = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
  elif isinstance(value, dict):
    for key, item in value.items():
      _flatten(item, f'{name}.{key}' if name else str(key), into)
  elif isinstance(value, (list, tuple)):
    for i, item in enumerate(value):
      _flatten(item, f'{name}.{i}' if name else str(i), into)
