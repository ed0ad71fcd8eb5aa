"""Orbax checkpoints of a run: the latest and the best step in one folder.

`workdir/checkpoints/<step>/{state,meta}`. Orbax writes a step into a
temporary folder and commits it by renaming, so a kill at any instant leaves
the committed steps intact (temporary folders of killed saves are removed
when the run opens its checkpoints again). After each commit, steps that are
neither the newest nor the best by validation AP (the earliest on ties, as
the reference's `SaveModelCallback`) are discarded: renamed away first, so a
kill mid-deletion leaves nothing that looks like a step. "Latest" and "best"
can never disagree: both are committed steps, and each step's metadata says
what it holds, so the choice is made again from the files after a restart.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any

import jax
import orbax.checkpoint as ocp

_DISCARDED = ".discarded-"
_OLD_LAYOUT = ("latest", "best")  # checkpoints/{latest,best}/STEP of earlier versions.


class CheckpointError(RuntimeError):
  """A checkpoint could not be written (disk full, permissions...)."""


class RunCheckpoints:
  """The checkpoints of one run; saves are synchronous and committed on return.

  `read_only` opens no Orbax manager (nothing is cleaned or created), so a
  detector may read a run while it trains.
  """

  def __init__(self, workdir: str, read_only: bool = False):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self._manager = None
    if not read_only and self.has_old_layout():  # Never train over a run it cannot resume.
      raise CheckpointError(self.old_layout_message())
    if not read_only:
      self._manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
          create=True, enable_async_checkpointing=False, cleanup_tmp_directories=True))
      for name in os.listdir(self.directory):
        if name.startswith(_DISCARDED):  # A deletion cut short by a kill.
          shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

  def old_layout_message(self) -> str:
    return (f"{self.directory} has the layout of an earlier midog-jax (latest/STEP, best/STEP); "
            "move checkpoints/latest/STEP and checkpoints/best/STEP to checkpoints/STEP, "
            "remove the empty latest/ and best/, then run again")

  def has_old_layout(self) -> bool:
    return any(os.path.isdir(os.path.join(self.directory, d)) for d in _OLD_LAYOUT)

  def steps(self) -> list[int]:
    """Committed steps (Orbax's temporary folders carry a suffix, never digits only)."""
    if not os.path.isdir(self.directory):
      return []
    return sorted(int(n) for n in os.listdir(self.directory) if n.isdigit())

  def latest_step(self) -> int | None:
    steps = self.steps()
    return steps[-1] if steps else None

  def best_step(self) -> int | None:
    """The step with the best validation AP, or None when none was measured."""
    scored = [(m["valid_ap"], -s, s) for s in self.steps()
              if (m := self.meta(s)).get("valid_ap") is not None]
    return max(scored)[2] if scored else None

  def meta(self, step: int) -> dict[str, Any]:
    """The JSON saved with `step` ({} if unreadable)."""
    path = os.path.join(self.directory, str(step), "meta", "metadata")
    try:
      with open(path, encoding="utf-8") as f:
        return json.load(f)
    except (OSError, json.JSONDecodeError):
      return {}

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Commits `state` and `meta` at `step`, then discards superseded steps.

    A step already committed is kept as it is. `meta["valid_ap"]` (when not
    None) ranks the step for the best checkpoint. Raises CheckpointError,
    with the previous checkpoints left usable.
    """
    if step in self.steps():
      return
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
      self._manager.wait_until_finished()
    except (OSError, ValueError, RuntimeError) as e:
      previous = self.latest_step()
      kept = (f"the checkpoint of step {previous} is kept" if previous is not None
              else "no earlier checkpoint exists")
      raise CheckpointError(
          f"could not save the checkpoint of step {step} in {self.directory} "
          f"({type(e).__name__}: {e}); {kept}. Free disk space or fix permissions, then "
          "run the same command to resume.") from e
    if jax.process_index() == 0:
      keep = {self.latest_step(), self.best_step()}
      for s in self.steps():
        if s not in keep:
          trash = os.path.join(self.directory, f"{_DISCARDED}{s}-{uuid.uuid4().hex[:8]}")
          os.rename(os.path.join(self.directory, str(s)), trash)
          shutil.rmtree(trash, ignore_errors=True)
    self._manager.reload()

  def restore(self, like: Any, step: int | None = None) -> tuple[Any, dict[str, Any]] | None:
    """(state, meta) of `step` (default: newest), shaped and sharded as `like`."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return out.state, out.meta

  def state_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step), "state")

  def close(self) -> None:
    if self._manager is not None:
      self._manager.close()
