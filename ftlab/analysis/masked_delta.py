"""Masked-delta checkpoints: only the entries a fine-tuning run changed, on top of its base.

A delta holds, for every parameter leaf that changed, the flat indices of the changed entries
and their final values (or the whole leaf when that is smaller: a new head), plus the
checksum of the base parameters it applies to and of the parameters it makes. Applying it to
the base gives the run's parameters bit for bit; applying it to other weights is refused.
The idea of storing a sparse update on shared pretrained weights is FISH's (Sung et al.,
NeurIPS 2021, "Training Neural Networks with Fixed Sparse Masks"), whose masked fine-tuning
makes such deltas small.

On disk a delta is one uncompressed `.npz` (readable with numpy alone): `PATH::indices`
(uint32, ascending) and `PATH::values` per sparsely stored leaf, `PATH::dense` per densely
stored one, and `__header__`, a JSON text as uint8 UTF-8 bytes (format, checksums, every leaf's
shape, dtype, storage and changed count, and what the writer adds, e.g. the run and its base;
a 0-d string array in files from before 2026-12-03, still read).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any, Mapping

import numpy as np

from ftlab.errors import InputError

FORMAT = 'ftlab-masked-delta-1'
HEADER = '__header__'


class DeltaError(InputError):
  """A delta that does not fit the weights it is applied to, or a file that is no delta."""


def checksum(params: Mapping[str, np.ndarray]) -> str:
  """sha256 over every leaf's path, dtype, shape and bytes, in sorted path order."""
  digest = hashlib.sha256()
  for p in sorted(params):
    x = np.ascontiguousarray(params[p])
    # Dtype and shape are hashed with the bytes: the same bytes read as another shape or dtype
    # are other weights.
    digest.update(f'{p}:{x.dtype.str}:{x.shape}:'.encode())
    digest.update(hashlib.sha256(x.tobytes()).digest())
  return 'sha256:' + digest.hexdigest()


def _changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Flat indices of entries whose bits differ (so -0.0 vs 0.0 and NaN payloads count)."""
  # Compared as unsigned integers of the same width: float `!=` would call -0.0 equal to 0.0
  # and every NaN different from itself.
  view = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize]
  a = np.ascontiguousarray(a).reshape(-1).view(view)
  b = np.ascontiguousarray(b).reshape(-1).view(view)
  return np.flatnonzero(a != b).astype(np.uint32)


def make(
  initial: Mapping[str, np.ndarray], final: Mapping[str, np.ndarray], **about: Any
) -> dict[str, Any]:
  """The delta from `initial` (the base) to `final`.

  Args:
    initial: `{path: array}`, the base: the weights the run started from.
    final: `{path: array}`, the run's weights: the same paths, shapes and dtypes.
    **about: JSON-serialisable fields for the header (run, step, base description).

  Returns:
    `{'header': dict, 'arrays': {name: array}}`, as `save` writes it.

  Raises:
    DeltaError: the two sets of weights differ in paths, shapes or dtypes.
  """
  base = initial
  if set(base) != set(final):
    raise DeltaError(f'base and final weights differ in paths: {sorted(set(base) ^ set(final))}')
  leaves, arrays = {}, {}
  for p in sorted(base):
    b, f = np.asarray(base[p]), np.asarray(final[p])
    if b.shape != f.shape or b.dtype != f.dtype:
      raise DeltaError(f'{p}: base {b.shape} {b.dtype}, final {f.shape} {f.dtype}')
    if b.size >= 2**32:
      raise DeltaError(f'{p}: {b.size} entries do not fit uint32 indices')
    index = _changed(b, f)
    # Each leaf stored the cheaper way: a changed entry costs its index and its value, so past
    # about half the entries (float32) the whole leaf is smaller.
    sparse_bytes = index.size * (index.itemsize + f.itemsize)
    storage = 'unchanged' if not index.size else 'sparse' if sparse_bytes < f.nbytes else 'dense'
    if storage == 'sparse':
      arrays[f'{p}::indices'] = index
      arrays[f'{p}::values'] = np.ascontiguousarray(f).reshape(-1)[index]
    elif storage == 'dense':
      arrays[f'{p}::dense'] = f
    leaves[p] = dict(
      shape=list(b.shape), dtype=b.dtype.str, storage=storage, changed=int(index.size)
    )
  header = dict(
    format=FORMAT,
    base_checksum=checksum(base),
    result_checksum=checksum(final),
    entries=int(sum(np.size(x) for x in base.values())),
    changed=int(sum(v['changed'] for v in leaves.values())),
    leaves=leaves,
    **about,
  )
  return {'header': header, 'arrays': arrays}


def apply(base: Mapping[str, np.ndarray], delta: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The run's weights: `base` with the delta's entries written in, checked by checksum.

  Raises:
    DeltaError: `base` is not the delta's base (another checksum), or the result is not the
      weights the delta was made from.
  """
  header, arrays = delta['header'], delta['arrays']
  found = checksum(base)
  if found != header['base_checksum']:
    raise DeltaError(
      f'the base weights have checksum {found}; this delta applies to {header["base_checksum"]}'
      + (f' ({header["base"]})' if header.get('base') else '')
    )
  out = {}
  for p, leaf in header['leaves'].items():
    # A contiguous copy: `reshape(-1)` below is then a view, so the assignment writes into `x`
    # (on a non-contiguous array it would write into a temporary and be lost).
    x = np.array(base[p], copy=True)
    if leaf['storage'] == 'dense':
      x = np.array(arrays[f'{p}::dense'], copy=True)
    elif leaf['storage'] == 'sparse':
      x.reshape(-1)[arrays[f'{p}::indices']] = arrays[f'{p}::values']
    out[p] = x
  # Checked after applying too: a delta file damaged in its values (not its header) still
  # fails loudly.
  if checksum(out) != header['result_checksum']:
    raise DeltaError('the delta applied to its base does not give the weights it was made from')
  return out


def serialize(delta: Mapping[str, Any]) -> bytes:
  """The bytes of `delta`'s file as `save` writes it (`len` of them: the file's size)."""
  buffer = io.BytesIO()
  # Uncompressed `savez`: readable by numpy alone, and float values of sparse entries barely
  # compress. The header is its UTF-8 JSON as uint8 (a numpy string array would spend 4 bytes
  # per character: most of a small plan's file), so `load` needs no pickle.
  header = np.frombuffer(json.dumps(delta['header']).encode(), np.uint8)
  np.savez(buffer, **{HEADER: header}, **delta['arrays'])
  return buffer.getvalue()


def save(path: str, delta: Mapping[str, Any]) -> int:
  """Writes `delta` to `path` (an `.npz`), atomically; returns the file's size in bytes."""
  partial = f'{path}.tmp{os.getpid()}'
  with open(partial, 'wb') as f:
    f.write(serialize(delta))
  os.replace(partial, path)
  return os.path.getsize(path)


def load(path: str) -> dict[str, Any]:
  """A delta written by `save`.

  Raises:
    DeltaError: the file is not a masked delta of this format.
  """
  with np.load(path, allow_pickle=False) as data:
    if HEADER not in data.files:
      raise DeltaError(f'{path} is not a masked delta (no {HEADER})')
    stored = data[HEADER]
    # uint8 UTF-8 bytes; files written before were a 0-d string array.
    text = stored.tobytes().decode() if stored.dtype == np.uint8 else str(stored)
    header = json.loads(text)
    arrays = {k: data[k] for k in data.files if k != HEADER}
  if header.get('format') != FORMAT:
    raise DeltaError(f'{path}: format {header.get("format")!r}, expected {FORMAT!r}')
  return {'header': header, 'arrays': arrays}
