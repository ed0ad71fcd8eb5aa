"""A workdir that cannot be written is said in one line with the remedy."""

import builtins
import errno
import os

import pytest

from midog_jax.training import workdir


def test_a_read_only_or_forbidden_workdir_is_one_line(tmp_path, monkeypatch):
  target = str(tmp_path / "w")
  real_makedirs = os.makedirs

  def read_only(path, exist_ok=False):
    raise OSError(errno.EROFS, "Read-only file system", path)
  monkeypatch.setattr(os, "makedirs", read_only)
  with pytest.raises(workdir.WorkdirNotWritable, match=f"{target}: the workdir is on a "
                     "read-only file system; pass another --workdir"):
    workdir.make(target)

  def forbidden(path, exist_ok=False):
    raise PermissionError(errno.EACCES, "Permission denied", path)
  monkeypatch.setattr(os, "makedirs", forbidden)
  with pytest.raises(workdir.WorkdirNotWritable, match="not writable \\(Permission denied\\); "
                     "fix its permissions or pass another --workdir"):
    workdir.make(target)
  monkeypatch.setattr(os, "makedirs", real_makedirs)
  workdir.make(target)
  assert os.path.isdir(target)

  real_open = builtins.open

  def no_lock(path, *args, **kwargs):
    if str(path).endswith(workdir.TRAIN_LOCK):
      raise OSError(errno.EROFS, "Read-only file system", path)
    return real_open(path, *args, **kwargs)
  monkeypatch.setattr(builtins, "open", no_lock)
  with pytest.raises(workdir.WorkdirNotWritable, match=f"{target}: the workdir is not writable"):
    workdir.Lock(target).acquire()
  assert isinstance(workdir.WorkdirNotWritable("x"), OSError)  # The commands print OSErrors.
