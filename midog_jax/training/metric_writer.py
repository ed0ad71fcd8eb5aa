"""Per-epoch metrics of a run: JSON lines and TensorBoard event files; its summary as text.

Imports nothing heavy: the `train` command formats its result with it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from midog_jax import atomic
from midog_jax import console


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
      f.flush()
      os.fsync(f.fileno())
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
  """The rows of `metrics.jsonl`; a torn last line (a kill mid-write) is left out."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  rows = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        if line.endswith("\n"):
          raise ValueError(f"{path}: a damaged line in the middle: {line[:80]!r}") from None
  return rows


def truncate(workdir: str, step: int) -> None:
  """Keeps the rows up to `step` (the committed checkpoint): a resumed run
  then writes every later epoch once, whatever the moment of the kill."""
  rows = read_metrics(workdir)
  kept = [r for r in rows if r["step"] <= step]
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path) and (len(kept) != len(rows) or not _ends_cleanly(path)):
    atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def _ends_cleanly(path: str) -> bool:
  with open(path, "rb") as f:
    f.seek(0, os.SEEK_END)
    if f.tell() == 0:
      return True
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b"\n"


def format_summary(summary: dict[str, Any], workdir: str) -> str:
  """The run's result as a few aligned lines."""
  if summary.get("status") != "finished":
    return (f"run     {workdir}\nstatus  {summary.get('status')} at step {summary.get('step')}; "
            "run the same command again to resume")
  final = summary.get("final") or {}
  rows = [("run", workdir), ("status", "finished"),
          ("epochs", f"{summary.get('epochs')} ({summary.get('steps')} steps)"),
          *((f"{k} loss", ("n/a" if final.get(f"{k}_loss") is None
                           else format(final[f"{k}_loss"], ".4f")) + " (last epoch)")
            for k in ("train", "valid"))]
  if summary.get("best_valid_ap") is not None:
    rows.append(("best valid AP", f"{summary['best_valid_ap']:.4f} at step "
                 f"{summary.get('best_step')} (the checkpoint detection uses)"))
  rows.append(("training time", console.format_duration(summary.get("train_seconds") or 0)))
  if summary.get("selection_warning"):
    rows.append(("warning", summary["selection_warning"]))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
