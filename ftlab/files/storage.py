"""Where run files live: a local directory or an object store, through one path layer.

Every file a run, `combine` or the activation cache reads or writes goes through `path`, an
etils `epath.Path` (the layer Orbax writes checkpoints through), so a `gs://` or `s3://`
workdir holds the same files as a local one. Two things differ on an object store, and the
helpers here hide them:

- An object cannot be appended to (epath's `open('a')` there silently overwrites), so
  `Appender` rewrites the whole object, which the store replaces atomically; a local file is
  appended to, line by line, as before (a killed run loses at most the line being written).
- A rename is a copy and a delete, so writers write objects in place rather than a temporary
  name renamed into place: an object appears whole or not at all.
"""

from __future__ import annotations

import os
from typing import Union

from etils import epath

from ftlab.errors import InputError

# URL schemes a workdir may use: epath reads and writes them (gcsfs / s3fs, or tf.io.gfile),
# Orbax's TensorStore writes checkpoints to them. Only `gs://` is tested (on an emulator).
SCHEMES = ('gs', 's3')
PathLike = Union[str, os.PathLike]


class UnsupportedPath(InputError):
  """A URL whose scheme ftlab cannot write run files to."""


def scheme(value: PathLike) -> str:
  """`gs` for `gs://bucket/run`, '' for a local path."""
  value = os.fspath(value)
  return value.split('://', 1)[0] if '://' in value else ''


def check(value: PathLike, what: str = 'path') -> None:
  """Raises UnsupportedPath, one line naming `what`, the value and the valid schemes, unless
  `value` is a local path or a URL of one of `SCHEMES`."""
  found = scheme(value)
  if found and found not in SCHEMES:
    hint = (
      " (TensorFlow's in-process memory filesystem: nothing in it outlives the run, and "
      'Orbax cannot write checkpoints there)'
      if found == 'ram'
      else ''
    )
    valid = ', '.join(f'{s}://' for s in SCHEMES)
    raise UnsupportedPath(
      f'{what} {os.fspath(value)!r}: unsupported scheme {found}://{hint}; use a local path, '
      f'or {valid}'
    )


def path(value: PathLike, what: str = 'path') -> epath.Path:
  """`value` as an `epath.Path`: a local path made absolute (TensorStore refuses relative
  ones), a URL as it is.

  Raises:
    UnsupportedPath: a URL of a scheme not in `SCHEMES` (see `check`).
  """
  check(value, what)
  value = os.fspath(value)
  return epath.Path(value if scheme(value) else os.path.abspath(value))


def is_remote(value: PathLike) -> bool:
  """Whether `value` is a URL (an object store) rather than a local path."""
  return bool(scheme(value))


class Appender:
  """A file that grows: appended to locally, rewritten whole on an object store.

  On an object store the file's contents are read once, when the `Appender` is made, and
  kept, so each `write` is one upload of the whole object; only this writer may write the
  file meanwhile (in ftlab, process 0 writes a workdir's records).

  Args:
    file: the file (created, with its parent directories, if missing).
    binary: `write` takes bytes rather than text.
  """

  def __init__(self, file: PathLike, binary: bool = False):
    self.file = path(file)
    self.file.parent.mkdir(parents=True, exist_ok=True)
    self._local, self._contents = None, None
    if is_remote(self.file):
      read = self.file.read_bytes if binary else self.file.read_text
      # Read once and kept: each `write` then uploads the whole object, which a store replaces
      # atomically, instead of a read-modify-write per line.
      self._contents = read() if self.file.exists() else (b'' if binary else '')
    else:
      self._local = open(self.file, 'ab' if binary else 'a')

  def write(self, data: Union[str, bytes]) -> None:
    if self._local is not None:
      self._local.write(data)
      # Flushed per write: a killed run keeps every line written before the kill.
      self._local.flush()
    else:
      self._contents += data
      write = self.file.write_bytes if isinstance(data, bytes) else self.file.write_text
      write(self._contents)

  def close(self) -> None:
    if self._local is not None:
      self._local.close()


def write_whole(file: PathLike, data: Union[str, bytes]) -> None:
  """Writes `file` so that no reader sees part of it (parent directories created): locally a
  temporary file renamed into place, on an object store the object itself (an upload
  replaces an object at once)."""
  target = path(file)
  target.parent.mkdir(parents=True, exist_ok=True)
  binary = isinstance(data, bytes)
  if is_remote(target):
    (target.write_bytes if binary else target.write_text)(data)
    return
  # The process id in the temporary name: two processes writing the same file never write
  # into one temporary file.
  partial = f'{target}.tmp{os.getpid()}'
  with open(partial, 'wb' if binary else 'w') as f:
    f.write(data)
  os.replace(partial, target)


def append_text(file: PathLike, text: str) -> None:
  """Appends `text` to `file` (see `Appender`)."""
  appender = Appender(file)
  try:
    appender.write(text)
  finally:
    appender.close()
