"""A run group killed at any moment and resumed ends as the uninterrupted group, bit for bit.

The five runs of tests/training/test_group.py (one with epochs twice as
long), here with model selection every epoch, are trained as a group
without interruption, and again interrupted three ways: SIGKILL of the
`train --member ...` command once the first epoch's metrics rows are being
written, SIGTERM (every member saves where it is, mid-epoch), and a kill
between two members' last checkpoint commits; then the same group resumes,
its members at different epochs, most of them finished, and finishes. Every
member's retained steps, best step, parameters, `metrics.jsonl` and
`summary.json` must equal those of the uninterrupted group (times aside).
The kills reuse the crash-safety harness of test_crash_safety.py.
"""

import os
import signal
import sys

import jax
import numpy as np
import pytest

from midog_jax.training import checkpoints
from midog_jax.training import group
from midog_jax.training import inputs
from midog_jax.training import metric_writer
from midog_jax.training import trainer
from tests.helpers import env_without_accelerators
from tests.system.test_crash_safety import _kill_when, _outcome
from tests.training.test_group import member_configs, member_options, one_device, toy  # noqa: F401

# `python -m midog_jax.train` with the toy body registered, on the first of the
# eight devices the tests' processes have, as the runs in this process: its
# programs are then this process's, compiled once for both (the compilation
# cache's keys include the device count).
DRIVER = ("import sys; from tests.training.test_group import register_toy; register_toy(); "
          "import jax; from midog_jax import commands, sharding, train; make = sharding.make_mesh; "
          "sharding.make_mesh = lambda devices=None: make(devices or jax.devices()[:1]); "
          "sys.exit(commands.absl_main(train.main, 'midog_jax.train', train.__doc__))")


class _Killed(BaseException):
  """Stands for a kill: nothing catches it, and it ends the group where it is."""


def _rows(workdir) -> int:
  return len(metric_writer.read_metrics(str(workdir)))


def _committed(workdir) -> list[int]:
  ckpt = checkpoints.RunCheckpoints(str(workdir), read_only=True)
  return ckpt.steps()


def test_a_killed_group_resumes_to_the_uninterrupted_group(synthetic_data_dir, tmp_path, toy,
                                                           monkeypatch):
  selection = {"eval.every_epochs": 1, "eval.selection": "reference"}
  configs = member_configs(synthetic_data_dir, **selection)
  mesh = one_device()
  datas = [inputs.build(c, mesh) for c in configs]
  full = [tmp_path / "full" / f"run{k}" for k in range(5)]
  cut = [tmp_path / "cut" / f"run{k}" for k in range(5)]
  group.train_group(configs, full, datas, mesh)

  def resume():
    return group.train_group(configs, cut, datas, mesh)

  # 1. SIGKILL of the command line as soon as the first metrics row is written.
  env = env_without_accelerators()
  cmd = [sys.executable, "-c", DRIVER, *(a for k, w in enumerate(cut) for a in (
      "--member", " ".join(member_options(synthetic_data_dir, w, k, **selection))))]
  _kill_when(cmd, env, lambda: _rows(cut[0]) >= 1)
  # Run 0's row is written, its commit at most: the later members' saves never began.
  assert _rows(cut[0]) == 1 and _committed(cut[3]) == []

  # 2. SIGTERM at the first step of the resumed group: each member saves where it is.
  after_step = trainer.Run.after_step

  def sigterm_once(run, *args):
    out = after_step(run, *args)
    if run.workdir == str(cut[1]) and not sigterm_once.sent:
      sigterm_once.sent = True
      os.kill(os.getpid(), signal.SIGTERM)
    return out
  sigterm_once.sent = False
  monkeypatch.setattr(trainer.Run, "after_step", sigterm_once)
  results = resume()
  assert sigterm_once.sent
  monkeypatch.setattr(trainer.Run, "after_step", after_step)
  interrupted = [r.summary["step"] for r in results if r.summary["status"] == "interrupted"]
  assert interrupted and all(s % 2 == 1 for s in interrupted)  # Mid-epoch.

  # 3. A kill inside the last step's saves: runs 0-2 commit their last epoch, runs 3-4 do not.
  save = checkpoints.RunCheckpoints.save

  def killed_at_run3(ckpt, step, state, meta):
    if ckpt.directory.startswith(str(cut[3])) and step == 4:
      raise _Killed
    return save(ckpt, step, state, meta)
  monkeypatch.setattr(checkpoints.RunCheckpoints, "save", killed_at_run3)
  with pytest.raises(_Killed):
    resume()
  monkeypatch.setattr(checkpoints.RunCheckpoints, "save", save)
  # Members at different epochs, most of them finished: the group resumes so.
  assert [(w / "summary.json").exists() for w in cut] == [True, True, True, False, False]
  assert _committed(cut[3]) == [2] and _rows(cut[3]) == 2  # A row past the commit, dropped.

  # 4. The same group finishes.
  resume()
  for k in range(5):
    expected, got = _outcome(full[k]), _outcome(cut[k])
    assert got[0] == expected[0] and got[1] == expected[1], k  # Retained steps, best step.
    for s in expected[0]:
      for a, b in zip(jax.tree.leaves(expected[2][s]), jax.tree.leaves(got[2][s])):
        np.testing.assert_array_equal(a, b, err_msg=f"run {k}, step {s}")
    assert got[3] == expected[3], f"metrics.jsonl of run {k}"
    assert got[4] == expected[4], f"summary.json of run {k}"
