"""Checkpoints: damaged steps passed over and set aside, save errors in one line."""

import errno
import json
import logging
import os
import pathlib

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from midog_jax.training import checkpoints


def _values(step):
  """Random (incompressible) values that say which step saved them."""
  rng = np.random.default_rng(step)
  return rng.standard_normal(600, np.float32), rng.standard_normal((20, 30), np.float32)


def _tree(step):
  """A small state of `step`."""
  w, b = _values(step)
  return {"w": jnp.asarray(w), "layer": {"b": jnp.asarray(b)}}


@pytest.fixture
def run(tmp_path):
  """A workdir with two committed steps: 1 (the best AP) and 2 (the newest)."""
  ckpt = checkpoints.RunCheckpoints(str(tmp_path))
  ckpt.save(1, _tree(1), {"step": 1, "valid_ap": 0.9})
  ckpt.save(2, _tree(2), {"step": 2, "valid_ap": 0.1})
  ckpt.close()
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]
  return tmp_path


def _array_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
  """The files that hold a step's array bytes (OCDBT: state/ocdbt.process_0/d/, state/d/)."""
  state = step_dir / "state"
  return [p for d in (state / "ocdbt.process_0" / "d", state / "d") if d.is_dir()
          for p in d.iterdir()]


def _truncate_arrays(step_dir: pathlib.Path) -> pathlib.Path:
  """Cuts the largest array file of a step to half, as a disk fault or a bad copy would."""
  biggest = max(_array_files(step_dir), key=lambda p: p.stat().st_size)
  size = biggest.stat().st_size
  assert size > 4 * 600  # It holds array data, not only an index node.
  with open(biggest, "r+b") as f:
    f.truncate(size // 2)
  return biggest


def _warnings(caplog):
  return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def _assert_is_step(state, step):
  w, b = _values(step)
  np.testing.assert_array_equal(np.asarray(state["w"]), w)
  np.testing.assert_array_equal(np.asarray(state["layer"]["b"]), b)


DAMAGE = {
    "an array file truncated": lambda d: _truncate_arrays(d),
    "the tree metadata truncated": lambda d: (d / "state" / "_METADATA").write_text('{"tree'),
    "the meta file missing": lambda d: (d / "meta" / "metadata").unlink(),
    "the meta file not JSON": lambda d: (d / "meta" / "metadata").write_text("{"),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_newest_step_is_set_aside_and_the_older_one_restored(run, caplog, damage):
  DAMAGE[damage](run / "checkpoints" / "2")
  ckpt = checkpoints.RunCheckpoints(str(run))
  with caplog.at_level(logging.WARNING):
    state, meta = ckpt.restore(_tree(0))
  _assert_is_step(state, 1)
  assert meta == {"step": 1, "valid_ap": 0.9}
  [warning] = _warnings(caplog)
  assert warning.startswith(f"{run / 'checkpoints' / '2'} cannot be read (")
  assert "step 1 is used instead" in warning and "\n" not in warning
  # Kept on disk, never deleted, but no longer a step.
  names = sorted(p.name for p in (run / "checkpoints").iterdir())
  assert names[0] == "1" and names[1].startswith("2.damaged-") and len(names) == 2
  assert f"kept as {names[1]}" in warning
  assert ckpt.steps() == [1] and ckpt.latest_step() == 1 and ckpt.best_step() == 1
  # The next save of step 2 is not refused as "already committed" (nor by Orbax).
  ckpt.save(2, _tree(22), {"step": 2, "valid_ap": 0.5})
  assert ckpt.steps() == [1, 2]
  _assert_is_step(ckpt.restore(_tree(0))[0], 22)
  ckpt.close()
  assert (run / "checkpoints" / names[1]).is_dir()


def test_the_damaged_bytes_stay_as_they_were(run, caplog):
  cut = _truncate_arrays(run / "checkpoints" / "2")
  size = cut.stat().st_size
  ckpt = checkpoints.RunCheckpoints(str(run))
  ckpt.restore(_tree(0))
  ckpt.close()
  [kept] = [p for p in (run / "checkpoints").iterdir() if ".damaged-" in p.name]
  assert (kept / cut.relative_to(run / "checkpoints" / "2")).stat().st_size == size


def test_no_readable_step_names_each_folder_and_the_remedy(run, caplog):
  for s in ("1", "2"):
    _truncate_arrays(run / "checkpoints" / s)
  ckpt = checkpoints.RunCheckpoints(str(run))
  with pytest.raises(checkpoints.CheckpointError) as info:
    ckpt.restore(_tree(0))
  ckpt.close()
  message = str(info.value)
  assert "\n" not in message
  assert f"{run / 'checkpoints' / '1'}: " in message and f"{run / 'checkpoints' / '2'}: " in message
  assert message.endswith("delete the damaged step folders to start again, or use a new --workdir")
  assert isinstance(info.value, OSError)  # The commands print an OSError as one line.
  # Nothing is renamed when no step could be read (no step is set aside for nothing).
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1", "2"]
  assert not _warnings(caplog)


@pytest.mark.parametrize("damaged", [False, True])
@pytest.mark.parametrize("change", ["a shape", "a leaf more", "a leaf less"])
def test_a_tree_that_does_not_fit_is_not_damage(run, caplog, change, damaged):
  if damaged:  # Even with damaged bytes, the configuration's error comes first.
    _truncate_arrays(run / "checkpoints" / "2")
  like = _tree(0)
  if change == "a shape":
    like["w"] = jnp.zeros(599)
  elif change == "a leaf more":
    like["extra"] = jnp.zeros(3)
  else:
    del like["layer"]
  ckpt = checkpoints.RunCheckpoints(str(run))
  with pytest.raises((ValueError, KeyError, TypeError)) as info:
    ckpt.restore(like)
  ckpt.close()
  # What trainer.py turns into WorkdirMismatch: not a CheckpointError.
  assert not isinstance(info.value, checkpoints.CheckpointError)
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1", "2"]
  assert not _warnings(caplog)


def test_detection_takes_the_best_intact_step_and_renames_nothing(run, caplog):
  ckpt = checkpoints.RunCheckpoints(str(run), read_only=True)
  step, state = ckpt.restore_best(_tree(0))
  assert step == 1
  _assert_is_step(state, 1)
  _truncate_arrays(run / "checkpoints" / "1")  # The best.
  with caplog.at_level(logging.WARNING):
    step, state = ckpt.restore_best(_tree(0))
  assert step == 2
  _assert_is_step(state, 2)
  [warning] = _warnings(caplog)
  assert warning.startswith(f"{run / 'checkpoints' / '1'} cannot be read (")
  assert "step 2, the best intact step, is used instead" in warning
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1", "2"]
  # A step named by the user: no fallback, one line naming it.
  with pytest.raises(checkpoints.UnreadableCheckpoint) as info:
    checkpoints.read_state(str(run / "checkpoints" / "1"), _tree(0))
  assert str(info.value).startswith(f"{run / 'checkpoints' / '1'} cannot be read (")
  assert "\n" not in str(info.value) and "See full TensorStore" not in str(info.value)
  _assert_is_step(checkpoints.read_state(str(run / "checkpoints" / "2"), _tree(0)), 2)


def test_detection_prefers_the_best_ap_then_the_earliest_then_the_newest(tmp_path):
  aps = {1: 0.5, 2: 0.9, 3: None, 4: 0.9, 5: None, 6: 0.7}
  for step, ap in aps.items():
    meta = tmp_path / "checkpoints" / str(step) / "meta"
    meta.mkdir(parents=True)
    (meta / "metadata").write_text(json.dumps({"step": step, "valid_ap": ap}))
  (tmp_path / "checkpoints" / "7.damaged-0a1b2c3d").mkdir()
  ckpt = checkpoints.RunCheckpoints(str(tmp_path), read_only=True)
  assert ckpt.preference() == [2, 4, 6, 1, 5, 3]
  assert ckpt.best_step() == ckpt.preference()[0]


class _Unraisable:
  """An object whose finaliser raises: Python reports it through sys.unraisablehook."""

  def __del__(self):
    raise RuntimeError("Event loop is closed")


def _orbax_noise():
  """What a failing Orbax write sets off: an Orbax error with its traceback
  (logged through absl), an asyncio record and an unraisable exception."""
  absl = logging.getLogger("absl")
  record = absl.makeRecord("absl", logging.ERROR, os.path.join(os.path.dirname(ocp.__file__),
                           "_src", "futures", "future.py"), 387,
                           "_SignalingThread.run() raised an exception", (), None)
  absl.handle(record)
  logging.getLogger("asyncio").error("Task exception was never retrieved")
  _Unraisable()


@pytest.mark.parametrize("error, remedy", [
    (OSError(errno.EROFS, "Read-only file system"),
     "the workdir is not writable: fix its permissions or pass another --workdir"),
    (PermissionError(errno.EACCES, "Permission denied"),
     "the workdir is not writable: fix its permissions or pass another --workdir"),
    (OSError(errno.ENOSPC, "No space left on device"),
     "the disk is full: free disk space, then run the same command to resume"),
    # TensorStore's form of a full disk.
    (ValueError('RESOURCE_EXHAUSTED: Error writing "w/0": Failed to write 9 bytes to file 3: '
                "No space left on device [os_error_code='28']"),
     "the disk is full: free disk space, then run the same command to resume"),
])
def test_a_failed_save_is_one_line_with_its_remedy(run, monkeypatch, caplog, error, remedy):
  seen = []
  monkeypatch.setattr("sys.unraisablehook", seen.append)

  def failing_save(self, step, *args, **kwargs):
    _orbax_noise()
    raise error
  monkeypatch.setattr(ocp.CheckpointManager, "save", failing_save)
  ckpt = checkpoints.RunCheckpoints(str(run))
  with caplog.at_level(logging.DEBUG), pytest.raises(checkpoints.CheckpointError) as info:
    ckpt.save(3, _tree(3), {"step": 3})
  ckpt.close()
  message = str(info.value)
  assert message.startswith(f"could not save the checkpoint of step 3 in {run / 'checkpoints'} (")
  assert "the checkpoint of step 2 is kept" in message
  assert message.endswith(remedy) and "\n" not in message
  assert not [r for r in caplog.records if r.name in ("absl", "asyncio")]
  assert not seen
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1", "2"]


def test_a_successful_save_lets_orbax_notices_through(run, monkeypatch, caplog):
  seen = []
  monkeypatch.setattr("sys.unraisablehook", seen.append)
  original = ocp.CheckpointManager.save

  def noisy_save(self, step, *args, **kwargs):
    _orbax_noise()
    return original(self, step, *args, **kwargs)
  monkeypatch.setattr(ocp.CheckpointManager, "save", noisy_save)
  ckpt = checkpoints.RunCheckpoints(str(run))
  with caplog.at_level(logging.DEBUG):
    ckpt.save(3, _tree(3), {"step": 3, "valid_ap": 0.2})
  ckpt.close()
  assert ckpt.steps() == [1, 3]
  assert {r.name for r in caplog.records if r.levelno >= logging.ERROR} >= {"absl", "asyncio"}
  assert [type(u.exc_value) for u in seen] == [RuntimeError]


def test_a_checkpoints_folder_that_cannot_be_created_names_the_remedy(tmp_path, monkeypatch):
  def read_only(self, *args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "checkpoints"))
  monkeypatch.setattr(ocp.CheckpointManager, "__init__", read_only)
  with pytest.raises(checkpoints.CheckpointError, match=(
      r"could not open .*checkpoints \(OSError: \[Errno 30\] Read-only file system.*\); "
      r"the workdir is not writable: fix its permissions or pass another --workdir$")):
    checkpoints.RunCheckpoints(str(tmp_path))
