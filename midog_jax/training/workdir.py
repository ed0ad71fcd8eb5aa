"""A run's work directory: one process at a time, one configuration for life.

A workdir records what it trains (config.json, cases.json,
normalization.json, and stain.json with a stain switch) at its first start. A later start with a configuration
that changes the result is refused with the differing fields listed; only
fields that cannot change the result may differ. An exclusive lock
(`flock`, released by the kernel when its process dies, so a killed run
never leaves a stale lock) keeps a second process out. A launcher of many
runs (`experiments run`) holds a second lock, the claim, while a run trains
under it, so that other launchers pass that run by.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from typing import Any

from midog_jax import atomic

# Fields that do not change what is trained or selected.
NEUTRAL_FIELDS = frozenset({
    "data_dir", "cache_bytes", "stream_window", "prefetch", "input_workers",
    "log_every_steps", "eval.batch_size", "resume_anyway", "synthetic",
    "roi_store", "decoded_dir"})

# Fields added to the configuration after runs were recorded without them,
# with the value those runs had: such a run resumes unchanged.
ADDED_FIELDS = {"model.backbone": "resnet18", "augment.colour": [], "domains": "all",
                "stain_normalization": "none", "augment.randstainna": "none",
                "augment.randstainna_sigma": 1.0, "model.channels": 128}

TRAIN_LOCK = ".lock"  # Held by the training process.
CLAIM_LOCK = ".claim"  # Held by the launcher that started it.


class WorkdirInUse(RuntimeError):
  """Another process trains in this workdir."""


class WorkdirMismatch(ValueError):
  """The workdir holds a run of another configuration."""


class WorkdirNotWritable(PermissionError):
  """The workdir cannot be created or written."""


def make(workdir: str) -> None:
  """Creates `workdir` (and its parents), or says in one line why it cannot be written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    if not os.access(workdir, os.W_OK):
      raise PermissionError(errno.EACCES, "no write permission")
  except PermissionError as e:
    raise WorkdirNotWritable(f"{workdir}: the workdir is not writable ({e.strerror}); fix its "
                             "permissions or pass another --workdir") from None
  except OSError as e:
    if e.errno != errno.EROFS:
      raise
    raise WorkdirNotWritable(f"{workdir}: the workdir is on a read-only file system; pass "
                             "another --workdir") from None


class Lock:
  """An exclusive lock on `workdir/<name>`, held until `release` or exit."""

  def __init__(self, workdir: str, name: str = TRAIN_LOCK):
    self.path = os.path.join(workdir, name)
    self._file = None

  def acquire(self) -> "Lock":
    try:
      f = open(self.path, "a+", encoding="utf-8")
    except (PermissionError, OSError) as e:
      if not isinstance(e, PermissionError) and e.errno != errno.EROFS:
        raise
      raise WorkdirNotWritable(f"{os.path.dirname(self.path)}: the workdir is not writable "
                               f"({e.strerror}); fix its permissions or pass another "
                               "--workdir") from None
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "another process"
      f.close()
      raise WorkdirInUse(
          f"{os.path.dirname(self.path)} is in use by {holder}; wait for it to finish "
          "or choose another --workdir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    self._file = f
    return self

  def release(self) -> None:
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def holder(workdir: str, name: str = TRAIN_LOCK) -> str | None:
  """Who holds `workdir/<name>` ("pid N on HOST"), or None if nobody does.

  Probes without writing, so the file keeps naming its holder.
  """
  path = os.path.join(workdir, name)
  try:
    f = open(path, encoding="utf-8")
  except FileNotFoundError:
    return None
  with f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      return f.read().strip() or "another process"
    fcntl.flock(f, fcntl.LOCK_UN)
  return None


def claim(workdir: str) -> Lock | None:
  """The claim on a run for one launcher, or None if another process holds
  it or trains in `workdir` (a training started by hand)."""
  os.makedirs(workdir, exist_ok=True)
  try:
    lock = Lock(workdir, CLAIM_LOCK).acquire()
  except WorkdirInUse:
    return None
  if holder(workdir) is not None:
    lock.release()
    return None
  return lock


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _neutral(field: str) -> bool:
  return any(field == n or field.startswith(n + ".") for n in NEUTRAL_FIELDS)


def differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """'field: recorded -> current' for every result-changing difference."""
  a, b = flatten(recorded), flatten(current)
  a, b = ({**ADDED_FIELDS, **a}, {**ADDED_FIELDS, **b})
  out = []
  for k in sorted(set(a) | set(b)):
    if not _neutral(k) and json.dumps(a.get(k)) != json.dumps(b.get(k)):
      out.append(f"{k}: {json.dumps(a.get(k, '(absent)'))} -> {json.dumps(b.get(k, '(absent)'))}")
  return out


def check(workdir: str, run_files: dict[str, Any], resume_anyway: bool) -> list[str]:
  """Compares `run_files` ({name: JSON}) with what the workdir recorded.

  Returns the differences (empty for a new workdir). Raises WorkdirMismatch
  listing them unless `resume_anyway`. Nothing is written here: `record`
  comes after the checkpoint was restored, so a failed restore leaves the
  recorded files describing the checkpoint they belong to.
  """
  diffs = []
  for n, value in run_files.items():
    path = os.path.join(workdir, n)
    if not os.path.exists(path):
      continue
    recorded = atomic.read_json(path)
    if n == "config.json":
      diffs += differences(recorded, value)
    elif json.dumps(recorded, sort_keys=True) != json.dumps(value, sort_keys=True):
      diffs.append(f"{n} differs (other cases, folds or dataset)")
  if diffs and not resume_anyway:
    listed = "\n  ".join(diffs)
    raise WorkdirMismatch(
        f"{workdir} holds a run of another configuration:\n  {listed}\nUse a new --workdir, "
        "or pass --config.resume_anyway=True to continue this run with the new settings.")
  return diffs


def record(workdir: str, run_files: dict[str, Any]) -> None:
  """Writes each of `run_files` that is absent or differs (write, then rename)."""
  for n, value in run_files.items():
    path = os.path.join(workdir, n)
    if not os.path.exists(path) or atomic.read_json(path) != value:
      atomic.write_json(path, value)
