"""`python -m midog_jax.train` with a write error injected into a checkpoint save.

  python tests/system/fault_driver.py SAVE_NUMBER TRAIN_ARGS...

The SAVE_NUMBER-th checkpoint save of this process fails with ENOSPC, as
on a full disk, after Orbax has started writing.
"""

import errno
import sys

import orbax.checkpoint as ocp


def main():
  fail_at = int(sys.argv.pop(1))
  original = ocp.CheckpointManager.save
  calls = {"n": 0}

  def failing_save(self, step, *args, **kwargs):
    calls["n"] += 1
    if calls["n"] == fail_at:
      raise OSError(errno.ENOSPC, "No space left on device (injected)")
    return original(self, step, *args, **kwargs)

  ocp.CheckpointManager.save = failing_save
  from absl import app
  from midog_jax import train
  app.run(train.main)


if __name__ == "__main__":
  main()
