"""Named-tensor files (torch `.pth` and `.safetensors`) -> `{name: numpy array}`.

`.safetensors` needs only the `safetensors` package. `.pth` files are pickles, which can run
code when loaded: they are read with `torch.load(..., weights_only=True)`, which unpickles
tensors and plain containers only and refuses anything else, and torch is imported only
when such a file is read.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from typing import Any

import numpy as np

from ftlab.porting.common import PortError

# Checkpoint dicts often wrap the state dict under one of these keys.
WRAPPER_KEYS = ('state_dict', 'model', 'model_state_dict', 'state_dict_ema')
# `nn.DataParallel` / DDP prefix every name with this.
PARALLEL_PREFIX = 'module.'


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
    return 'pth' if any(n.endswith('/data.pkl') for n in names) else None
  if head.startswith(b'\x80'):
    return 'pth'
  return None


def read(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The named tensors of a `.safetensors` or `.pth` file, as numpy arrays.

  A `.pth` holding a checkpoint dict (`{'state_dict': ..., 'epoch': ...}`) gives its state
  dict; a `module.` prefix on every name (DataParallel) is dropped.

  Raises:
    PortError: the file is neither, is damaged, holds pickled code or other objects, or is a
      `.pth` and torch is not installed.
  """
  found = kind(path)
  if found == 'safetensors':
    tensors = _read_safetensors(path)
  elif found == 'pth':
    tensors = _read_pth(path)
  else:
    raise PortError(f'{path} is neither a .safetensors file nor a torch.save file')
  if tensors and all(n.startswith(PARALLEL_PREFIX) for n in tensors):
    tensors = {n[len(PARALLEL_PREFIX) :]: t for n, t in tensors.items()}
  return tensors


def names(path: str | os.PathLike) -> list[str]:
  """The tensor names in the file (cheap for `.safetensors`: only the header is read)."""
  if kind(path) == 'safetensors':
    try:
      from safetensors import safe_open

      with safe_open(os.fspath(path), framework='numpy') as f:
        return list(f.keys())
    except Exception as e:  # safetensors raises its own error types for damaged headers
      raise PortError(f'cannot read {path} as .safetensors: {e}') from None
  return list(read(path))


def _read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  try:
    from safetensors.numpy import load_file
  except ImportError:
    raise PortError(f'reading {path} needs the safetensors package (pip install safetensors)')
  try:
    return dict(load_file(os.fspath(path)))
  except Exception as e:  # SafetensorError for a truncated or malformed file
    raise PortError(f'cannot read {path} as .safetensors (truncated or damaged?): {e}') from None


def _read_pth(path: str | os.PathLike) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError:
    raise PortError(
      f'reading {path} (a torch pickle) needs torch; install it, or convert the file to '
      '.safetensors where torch is installed'
    ) from None
  try:
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
  return _state_dict(loaded, path)


def _state_dict(loaded: Any, path: str | os.PathLike) -> dict[str, np.ndarray]:
  import torch

  if isinstance(loaded, dict) and not any(isinstance(v, torch.Tensor) for v in loaded.values()):
    key = next((k for k in WRAPPER_KEYS if isinstance(loaded.get(k), dict)), None)
    if key is None:
      raise PortError(
        f'{path} holds no tensors at its top level nor a state dict under one of '
        f'{", ".join(WRAPPER_KEYS)}; keys: {", ".join(map(str, list(loaded)[:10]))}'
      )
    loaded = loaded[key]
  if not isinstance(loaded, dict):
    raise PortError(f'{path} holds a {type(loaded).__name__}, not a state dict')
  tensors = {}
  for name, value in loaded.items():
    if isinstance(value, torch.Tensor):
      value = value.detach()
      # bfloat16 has no numpy dtype; float32 keeps every value of it and of float16.
      tensors[str(name)] = (value.float() if value.is_floating_point() else value).numpy()
  return tensors
