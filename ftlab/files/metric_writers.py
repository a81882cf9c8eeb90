"""Where metrics go: `metrics.jsonl` (one JSON object per logged step) and TensorBoard.

Only the writing process (process 0 in a multi-host run) opens files; on the others a
writer accepts everything and writes nothing. Both go through `ftlab.files.storage`, so a
`gs://` workdir gets them as a local one does.

TensorBoard events are written by `tf.summary` into TensorFlow's in-process `ram://`
filesystem and copied, at every flush, into the workdir's `tensorboard/` through the path
layer (the new bytes appended locally; the object rewritten on a store). One route for every
workdir: `tf.summary`'s own `gs://` client cannot be pointed at another endpoint (an
emulator, a private store), and knows no `s3://` in current TensorFlow.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from typing import Mapping

import tensorflow as tf

from ftlab.files import storage


class MetricWriter:
  """Appends `{'step': n, 'train/loss': ..., ...}` lines and TensorBoard scalars.

  Args:
    jsonl_path: the JSON-lines file, appended to (a resumed run continues it); a local path
      or a URL (`storage.SCHEMES`).
    tensorboard_dir: the TensorBoard event directory (a new event file per writer).
    enabled: False on processes that must not write.

  Raises:
    storage.UnsupportedPath: a URL of another scheme.
  """

  def __init__(self, jsonl_path: str, tensorboard_dir: str, enabled: bool = True):
    self.enabled = enabled
    self._jsonl = self._tb = None
    if enabled:
      self._jsonl = storage.Appender(jsonl_path)
      self._tb_dir = storage.path(tensorboard_dir)
      self._tb_dir.mkdir(parents=True, exist_ok=True)
      # A fresh `ram://` directory per writer: two writers in one process (tests, a combine
      # script) must not copy each other's event files.
      self._ram = f'ram://ftlab-tensorboard-{uuid.uuid4().hex}'
      self._tb = tf.summary.create_file_writer(self._ram)
      self._events: dict[str, tuple[storage.Appender, int]] = {}

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    values = {k: float(v) for k, v in metrics.items()}
    record = {'step': int(step)}
    # JSON has no NaN or infinity (Python would write the non-standard `NaN`), so a non-finite
    # value is kept as the string 'nan' or 'inf', which other readers can parse.
    record.update({k: (v if math.isfinite(v) else str(v)) for k, v in values.items()})
    self._jsonl.write(json.dumps(record) + '\n')
    with self._tb.as_default(step=int(step)):
      for k, v in values.items():
        tf.summary.scalar(k, v)
    # Flushed at every write, so the copy below finds the new events and TensorBoard sees each
    # logged step while the run is going.
    self._tb.flush()
    self._copy_events()

  def _copy_events(self) -> None:
    """Appends what `tf.summary` wrote to `ram://` since the last copy to the workdir's files."""
    for name in tf.io.gfile.listdir(self._ram):
      if name not in self._events:
        self._events[name] = storage.Appender(self._tb_dir / name, binary=True), 0
      appender, sent = self._events[name]
      with tf.io.gfile.GFile(f'{self._ram}/{name}', 'rb') as f:
        # Only the bytes since the last copy: event files only grow, so `sent` is where the new
        # ones start.
        f.seek(sent)
        new = f.read()
      if new:
        appender.write(new)
        self._events[name] = appender, sent + len(new)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
      self._copy_events()
      for appender, _ in self._events.values():
        appender.close()
      tf.io.gfile.rmtree(self._ram)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  """The records of a `metrics.jsonl` file (a local path or a URL).

  Raises:
    storage.UnsupportedPath: a URL of another scheme.
  """
  text = storage.path(path).read_text()
  return [json.loads(line) for line in text.splitlines() if line.strip()]
