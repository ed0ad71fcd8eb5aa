"""Kills at any instant lose nothing: a resumed run equals an uninterrupted one.

A tiny training run (4 epochs of 4 steps, validation AP every epoch, so
every epoch end writes a metrics row and commits a checkpoint that may be
the best) is interrupted again and again: SIGKILL while a metrics row is
written and its checkpoint not yet committed, SIGKILL inside a checkpoint
save, SIGKILL at a random moment, SIGTERM followed by SIGKILL, and a save
that fails as on a full disk. After each, the same command resumes; the
final parameters, the best checkpoint, `metrics.jsonl` and `summary.json`
must be exactly those of the uninterrupted run (times aside).
"""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from midog_jax.training import checkpoints
from midog_jax.training import metric_writer
from tests.helpers import ROOT, env_without_accelerators
from tests.train_fixtures import network_flags

TIMING = ("epoch_seconds", "train_seconds")


@pytest.fixture(scope="module")
def env():
  env = env_without_accelerators()
  env.pop("XLA_FLAGS", None)  # One CPU device: the same check, compiled faster.
  return env  # With the session's compilation cache (conftest.py).


def _args(data_dir, workdir):
  return ["--config", str(ROOT / "configs" / "demo.py"), "--workdir", str(workdir),
          f"--config.data_dir={data_dir}", "--config.patch_size=64",
          "--config.batch_size=4", "--config.train_patches_per_epoch=16",
          "--config.valid_patches_per_epoch=8", "--config.num_epochs=4",
          "--config.eval.every_epochs=1", "--config.eval.batch_size=8",
          # The cheaper selection metric: what is checked is the resume, not the metric.
          "--config.eval.selection=reference",
          "--config.log_every_steps=3", "--config.prefetch=0", *network_flags()]


def _train(data_dir, workdir):
  return [sys.executable, "-m", "midog_jax.train", *_args(data_dir, workdir)]


def _run(cmd, env, expect=0):
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert proc.returncode == expect, proc.stderr[-3000:]
  return proc


def _kill_when(cmd, env, ready, after=0.0, sigterm_grace=None, timeout=300):
  """Starts `cmd`; once `ready()` holds, waits `after` s and kills it."""
  proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + timeout
  while not ready():
    if proc.poll() is not None:
      raise AssertionError(f"finished before the kill point: {proc.stderr.read()[-3000:]}")
    assert time.time() < deadline, "the kill point never came"
    time.sleep(0.002)
  time.sleep(after)
  if sigterm_grace is not None:
    proc.send_signal(signal.SIGTERM)
    time.sleep(sigterm_grace)
  proc.kill()
  proc.communicate(timeout=60)


def _committed(workdir) -> list[int]:
  root = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


def _saving(workdir) -> bool:
  root = pathlib.Path(workdir) / "checkpoints"
  return root.exists() and any("tmp" in p.name for p in root.iterdir())


def _rows(workdir) -> int:
  return len(metric_writer.read_metrics(str(workdir)))


def _outcome(workdir):
  ckpt = checkpoints.RunCheckpoints(str(workdir), read_only=True)
  try:
    steps, best = ckpt.steps(), ckpt.best_step()
  finally:
    ckpt.close()
  with ocp.CheckpointManager(pathlib.Path(workdir) / "checkpoints") as mngr:
    state = {s: jax.tree.map(np.asarray, mngr.restore(s, args=ocp.args.Composite(
        state=ocp.args.StandardRestore())).state) for s in steps}
  rows = [{k: v for k, v in r.items() if k not in TIMING}
          for r in metric_writer.read_metrics(str(workdir))]
  summary = json.loads((pathlib.Path(workdir) / "summary.json").read_text())
  summary = {k: v for k, v in summary.items() if k not in TIMING}
  summary["final"] = {k: v for k, v in summary["final"].items() if k not in TIMING}
  return steps, best, state, rows, summary


def test_kills_at_any_moment_then_resume_equal_the_uninterrupted_run(
    synthetic_data_dir, tmp_path, env):
  seed = random.randrange(1 << 30)
  rng = random.Random(seed)
  full, cut = tmp_path / "full", tmp_path / "cut"
  # The uninterrupted run goes on beside the interrupted ones.
  log = tmp_path / "uninterrupted.log"
  with open(log, "w") as stderr:
    uninterrupted = subprocess.Popen(_train(synthetic_data_dir, full), env=env, cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=stderr)
    try:
      _interrupt_and_resume(synthetic_data_dir, cut, env, rng)
      assert uninterrupted.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
      uninterrupted.kill()  # Only if the interrupted runs failed first.
  expected, got = _outcome(full), _outcome(cut)
  assert got[0] == expected[0], f"retained steps differ (seed {seed})"
  assert got[1] == expected[1], f"best step differs (seed {seed})"
  for s in expected[0]:
    for a, b in zip(jax.tree.leaves(expected[2][s]), jax.tree.leaves(got[2][s])):
      np.testing.assert_array_equal(a, b, err_msg=f"step {s} (seed {seed})")
  assert got[3] == expected[3], f"metrics.jsonl differs (seed {seed})"
  assert got[4] == expected[4], f"summary.json differs (seed {seed})"
  assert [r["epoch"] for r in got[3]] == [1, 2, 3, 4]
  assert not any("tmp" in p.name for p in (cut / "checkpoints").iterdir())
  # A kill after the last commit but before the summary: the rerun writes it.
  (cut / "summary.json").unlink()
  _run(_train(synthetic_data_dir, cut), env)
  assert _outcome(cut)[4] == expected[4]


def _interrupt_and_resume(synthetic_data_dir, cut, env, rng):
  """Kills the run in `cut` in five ways, then lets the same command finish it."""
  cmd = _train(synthetic_data_dir, cut)
  # 1. SIGKILL as soon as the first epoch's row is written, before (or while)
  #    its checkpoint is committed.
  _kill_when(cmd, env, lambda: _rows(cut) >= 1)
  assert _rows(cut) <= 1 and len(_committed(cut)) <= 1
  # 2. SIGKILL inside a checkpoint save (Orbax's temporary folder exists).
  _kill_when(cmd, env, lambda: _saving(cut))
  # 3. SIGKILL at a random moment after a later commit.
  n = len(_committed(cut))
  _kill_when(cmd, env, lambda: len(_committed(cut)) > n or _rows(cut) > 2,
             after=rng.uniform(0, 1.0))
  # 4. SIGTERM (the run saves and exits), then SIGKILL after a short grace.
  _kill_when(cmd, env, lambda: _rows(cut) >= 3, after=rng.uniform(0, 0.3),
             sigterm_grace=rng.uniform(0, 0.5))
  # 5. A save that fails as on a full disk: one line, the earlier checkpoint kept.
  before = _committed(cut)
  failed = _run([sys.executable, str(ROOT / "tests" / "system" / "fault_driver.py"), "1",
                 *_args(synthetic_data_dir, cut)], env, expect=2)
  last = failed.stderr.strip().splitlines()[-1]
  assert last.startswith("error: could not save the checkpoint") and "No space left" in last
  assert "Traceback" not in failed.stderr
  assert _committed(cut)[-1:] == before[-1:] or not before
  # Then the same command finishes the run.
  _run(cmd, env)


def test_a_second_training_on_the_same_workdir_is_refused(synthetic_data_dir, tmp_path):
  from midog_jax import sharding
  from midog_jax.training import inputs
  from midog_jax.training import trainer
  from midog_jax.training import workdir
  from tests.train_fixtures import tiny_config
  config = tiny_config(synthetic_data_dir)
  mesh = sharding.make_mesh(jax.devices()[:1])
  data = inputs.build(config, mesh)
  os.makedirs(tmp_path / "w")
  with workdir.Lock(str(tmp_path / "w")):
    with pytest.raises(workdir.WorkdirInUse, match=f"in use by pid {os.getpid()}.*another --workdir"):
      trainer.train(config, str(tmp_path / "w"), data, mesh)
  assert not (tmp_path / "w" / "config.json").exists()  # Refused before writing anything.


def test_a_run_of_the_earlier_checkpoint_layout_is_never_trained_over(tmp_path):
  (tmp_path / "checkpoints" / "latest" / "40").mkdir(parents=True)
  with pytest.raises(checkpoints.CheckpointError, match=r"earlier midog-jax.*move checkpoints/latest"):
    checkpoints.RunCheckpoints(str(tmp_path))
  assert (tmp_path / "checkpoints" / "latest" / "40").is_dir()
  assert checkpoints.RunCheckpoints(str(tmp_path), read_only=True).has_old_layout()
