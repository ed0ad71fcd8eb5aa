"""Per-epoch metrics of a run: JSON lines and TensorBoard event files."""

from __future__ import annotations

import json
import os
from typing import Any


class MetricWriter:
  """Writes `workdir/metrics.jsonl` and `workdir/tensorboard/` (process 0)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      try:
        import tensorflow as tf  # Event files only; kept off accelerators.
        tf.config.set_visible_devices([], "GPU")
        self._tf = tf
        self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
      except ImportError:  # Where TensorFlow is absent, JSON lines only.
        self._tb = None

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps({"step": step, **metrics}) + "\n")
    if self._tb is not None:
      with self._tb.as_default(step=step):
        for k, v in metrics.items():
          if isinstance(v, (int, float)) and v is not None:
            self._tf.summary.scalar(k, v)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
