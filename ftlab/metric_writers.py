"""Where metrics go: `metrics.jsonl` (one JSON object per logged step) and TensorBoard.

Only the writing process (process 0 in a multi-host run) opens files; on the others a
writer accepts everything and writes nothing.
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

import tensorflow as tf


class MetricWriter:
  """Appends `{'step': n, 'train/loss': ..., ...}` lines and TensorBoard scalars.

  Args:
    jsonl_path: the JSON-lines file, appended to (a resumed run continues it).
    tensorboard_dir: the TensorBoard event directory.
    enabled: False on processes that must not write.
  """

  def __init__(self, jsonl_path: str, tensorboard_dir: str, enabled: bool = True):
    self.enabled = enabled
    self._jsonl = self._tb = None
    if enabled:
      os.makedirs(os.path.dirname(jsonl_path) or '.', exist_ok=True)
      self._jsonl = open(jsonl_path, 'a')
      self._tb = tf.summary.create_file_writer(tensorboard_dir)

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    values = {k: float(v) for k, v in metrics.items()}
    record = {'step': int(step)}
    record.update({k: (v if math.isfinite(v) else str(v)) for k, v in values.items()})
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    with self._tb.as_default(step=int(step)):
      for k, v in values.items():
        tf.summary.scalar(k, v)
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def read_jsonl(path: str) -> list[dict]:
  """The records of a `metrics.jsonl` file."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
