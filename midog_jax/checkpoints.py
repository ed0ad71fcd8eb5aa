"""Orbax checkpoints of a run: the latest (every epoch and on interruption)
and the best by validation AP, each with the run's metadata as JSON."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class RunCheckpoints:
  """`workdir/checkpoints/{latest,best}/<step>/{state,meta}`."""

  def __init__(self, workdir: str):
    root = os.path.join(os.path.abspath(workdir), "checkpoints")
    opts = dict(max_to_keep=1, enable_async_checkpointing=True, create=True)
    self.latest = ocp.CheckpointManager(os.path.join(root, "latest"),
                                        options=ocp.CheckpointManagerOptions(**opts))
    self.best = ocp.CheckpointManager(os.path.join(root, "best"),
                                      options=ocp.CheckpointManagerOptions(**opts))

  def save(self, manager: ocp.CheckpointManager, step: int, state: Any,
           meta: dict[str, Any]) -> None:
    """Saves asynchronously; a save at an existing step replaces it."""
    if step in manager.all_steps():
      manager.wait_until_finished()
      manager.delete(step)
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

  def restore(self, manager: ocp.CheckpointManager, like: Any,
              step: int | None = None) -> tuple[Any, dict[str, Any]] | None:
    """(state, meta) of `step` (default: newest), shaped and sharded as `like`."""
    step = manager.latest_step() if step is None else step
    if step is None:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    out = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return out.state, out.meta

  def restore_meta(self, manager: ocp.CheckpointManager) -> dict[str, Any] | None:
    step = manager.latest_step()
    if step is None:
      return None
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()
