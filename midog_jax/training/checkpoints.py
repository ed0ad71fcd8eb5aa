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

A step whose files cannot be read (a truncated array file, a lost metadata
file) is damaged. A resume then takes the next older step that can be read,
with a warning, and renames the damaged one `<step>.damaged-<id>`: kept on
disk, never deleted here (it may be the only copy), but no longer a step, so
the next save and detection pass it by. Detection (`restore_best`) takes the
best intact step instead of a damaged best one; it renames nothing, as it
may read a run that is training. A checkpoint whose tree does not fit the
configuration is not damage: Orbax's error is raised as it is.

A failed save or read ends in one line: the Orbax and asyncio log records
and unraisable exceptions it sets off (hundreds of tracebacks on a full
disk) are dropped, and so are their late echoes from Orbax's abandoned
background writes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from etils import epath

from midog_jax.training import orbax_errors

_DISCARDED = ".discarded-"
_DAMAGED = ".damaged-"
_OLD_LAYOUT = ("latest", "best")  # checkpoints/{latest,best}/STEP of earlier versions.


class CheckpointError(RuntimeError):
  """A checkpoint could not be written (disk full, permissions...) or read."""


class UnreadableCheckpoint(CheckpointError, OSError):
  """A checkpoint's files cannot be read: it is damaged (an OSError to the commands)."""


class _Damaged(Exception):
  """A step's files failed to read; carries the reason on one line."""


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
      try:
        self._manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            create=True, enable_async_checkpointing=False, cleanup_tmp_directories=True))
      except OSError as e:
        raise CheckpointError(f"could not open {self.directory} ({orbax_errors.reason(e)}); "
                              f"{orbax_errors.remedy(e)}") from e
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
    """Committed steps (Orbax's temporary folders and damaged steps carry a suffix)."""
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

  def preference(self) -> list[int]:
    """Steps in the order detection takes them: by validation AP (the best, then
    the earliest first, as `best_step`), then those without one, newest first."""
    metas = {s: self.meta(s) for s in self.steps()}
    scored = sorted((s for s, m in metas.items() if m.get("valid_ap") is not None),
                    key=lambda s: (-metas[s]["valid_ap"], s))
    return scored + [s for s in reversed(metas) if s not in scored]

  def meta(self, step: int) -> dict[str, Any]:
    """The JSON saved with `step` ({} if unreadable)."""
    path = os.path.join(self.directory, str(step), "meta", "metadata")
    try:
      with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    except (OSError, json.JSONDecodeError):
      return {}
    return meta if isinstance(meta, dict) else {}

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Commits `state` and `meta` at `step`, then discards superseded steps.

    A step already committed is kept as it is. `meta["valid_ap"]` (when not
    None) ranks the step for the best checkpoint. Raises CheckpointError,
    with the previous checkpoints left usable.
    """
    if step in self.steps():
      return
    try:
      with orbax_errors.quiet_orbax():
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      # Orbax and TensorStore report write errors as OSError, ValueError,
      # RuntimeError or a plain Exception; others are bugs, raised as they are.
      if not (isinstance(e, (OSError, ValueError, RuntimeError)) or type(e) is Exception):
        raise
      previous = self.latest_step()
      kept = (f"the checkpoint of step {previous} is kept" if previous is not None
              else "no earlier checkpoint exists")
      raise CheckpointError(
          f"could not save the checkpoint of step {step} in {self.directory} "
          f"({orbax_errors.reason(e)}); {kept}; {orbax_errors.remedy(e)}") from e
    if jax.process_index() == 0:
      keep = {self.latest_step(), self.best_step()}
      for s in self.steps():
        if s not in keep:
          trash = os.path.join(self.directory, f"{_DISCARDED}{s}-{uuid.uuid4().hex[:8]}")
          os.rename(os.path.join(self.directory, str(s)), trash)
          shutil.rmtree(trash, ignore_errors=True)
    self._manager.reload()

  def restore(self, like: Any, step: int | None = None) -> tuple[Any, dict[str, Any]] | None:
    """(state, meta) of `step` (default: the newest that can be read), shaped and
    sharded as `like`; None when there is no step.

    Newer steps that cannot be read are set aside (`<step>.damaged-<id>`) with
    a warning each. Raises UnreadableCheckpoint when no step (or the named
    one) can be read, and Orbax's ValueError, KeyError or TypeError when a
    checkpoint does not fit `like`.
    """
    candidates = self.steps()[::-1] if step is None else [step]
    if not candidates:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    damaged: list[tuple[int, str]] = []
    for s in candidates:
      def read(s=s):
        out = self._manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        if not isinstance(out.meta, dict):  # The caller reads its fields.
          raise ValueError(f"meta/metadata holds a {type(out.meta).__name__}, not a JSON object")
        return out
      try:
        out = _read(self.state_path(s), abstract, read)
      except _Damaged as e:
        damaged.append((s, str(e)))
        continue
      self._set_aside(damaged, s)
      return out.state, out.meta
    raise UnreadableCheckpoint(self._unreadable_message(damaged))

  def restore_best(self, like: Any) -> tuple[int, Any] | None:
    """(step, state) of the best step that can be read (`preference` order),
    shaped as `like`, or None when there is no step; reads no meta and
    changes nothing on disk.

    A better step that cannot be read is passed over with a warning. Raises
    UnreadableCheckpoint when none can be read, and Orbax's error when a
    checkpoint does not fit `like`.
    """
    candidates = self.preference()
    if not candidates:
      return None
    damaged: list[tuple[int, str]] = []
    for s in candidates:
      try:
        state = _read_state(self.state_path(s), like)
      except _Damaged as e:
        damaged.append((s, str(e)))
        continue
      for d, why in damaged:
        logging.warning("%s cannot be read (%s); step %d, the best intact step, is used instead",
                        self.step_path(d), why, s)
      return s, state
    raise UnreadableCheckpoint(self._unreadable_message(damaged))

  def _set_aside(self, damaged: list[tuple[int, str]], used: int) -> None:
    """Renames each damaged step `<step>.damaged-<id>` (kept, no longer a step), with a warning."""
    if not damaged:
      return
    for s, why in damaged:
      path = self.step_path(s)
      kept = f"{path}{_DAMAGED}{uuid.uuid4().hex[:8]}"
      if jax.process_index() == 0:
        try:
          os.rename(path, kept)
        except FileNotFoundError:
          continue  # Another process set it aside.
        except OSError as e:
          raise CheckpointError(
              f"{path} cannot be read ({why}) and could not be set aside "
              f"({orbax_errors.reason(e)}); {orbax_errors.remedy(e)}") from e
        logging.warning("%s cannot be read (%s); it is kept as %s and step %d is used instead",
                        path, why, os.path.basename(kept), used)
    self._manager.reload()  # Orbax forgets the renamed steps: the next save is not refused.

  def _unreadable_message(self, damaged: list[tuple[int, str]]) -> str:
    what = "; ".join(f"{self.step_path(s)}: {orbax_errors.shorten(why, 150)}"
                     for s, why in damaged)
    return (f"no checkpoint in {self.directory} can be read ({what}); delete the damaged step "
            "folders to start again, or use a new --workdir")

  def step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def state_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step), "state")

  def close(self) -> None:
    if self._manager is not None:
      self._manager.close()


def read_state(step_dir: str, like: Any) -> Any:
  """The state saved in `step_dir` (WORKDIR/checkpoints/STEP), shaped as `like`.

  Raises UnreadableCheckpoint naming `step_dir` when its files cannot be
  read, and Orbax's error when its tree does not fit `like`.
  """
  try:
    return _read_state(os.path.join(step_dir, "state"), like)
  except _Damaged as e:
    raise UnreadableCheckpoint(
        f"{step_dir} cannot be read ({e}); the checkpoint is damaged: pass another step of "
        "the run (or its --workdir alone, for the best intact step), or delete this one") from None


def _read_state(state_path: str, like: Any) -> Any:
  """The state in `state_path` without an Orbax manager; raises _Damaged."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)

  def read():
    with ocp.StandardCheckpointer() as checkpointer:
      return checkpointer.restore(state_path, abstract)
  return _read(state_path, abstract, read)


def _read(state_path: str, abstract: Any, read: Callable[[], Any]) -> Any:
  """`read()`, with a failure sorted: _Damaged when the files are at fault,
  else the error as it is (a tree that does not fit, no memory)."""
  try:
    with orbax_errors.quiet_orbax():
      return read()
  except Exception as e:  # pylint: disable=broad-except
    # TensorStore raises a plain Exception, ValueError or KeyError for
    # unreadable bytes, as Orbax does for a tree that does not fit: the
    # checkpoint's own description tells them apart.
    if orbax_errors.is_memory(e) or not _is_damage(state_path, abstract):
      raise
    raise _Damaged(orbax_errors.reason(e)) from e


def _is_damage(state_path: str, abstract: Any) -> bool:
  """Whether a failed read of `state_path` into `abstract` is the files' fault:
  its recorded tree cannot be read, or it has the keys and shapes of
  `abstract` (so the bytes failed), not those of another configuration."""
  try:
    with orbax_errors.quiet_orbax():
      recorded = ocp.StandardCheckpointHandler().metadata(epath.Path(state_path)).tree
  except Exception as e:  # pylint: disable=broad-except
    return not orbax_errors.is_memory(e)
  want = ocp.tree.to_flat_dict(ocp.tree.serialize_tree(abstract, keep_empty_nodes=True))
  have = ocp.tree.to_flat_dict(recorded)
  if want.keys() != have.keys():
    return False
  return all(not hasattr(v, "shape") or _shape(have[k]) == tuple(v.shape)
             for k, v in want.items())


def _shape(leaf: Any) -> tuple[int, ...] | None:
  shape = getattr(leaf, "shape", None)
  return None if shape is None else tuple(shape)
