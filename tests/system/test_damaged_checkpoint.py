"""A damaged checkpoint in a trained run, and a save that fails inside TensorStore.

Detection passes a damaged best checkpoint by for the best intact one, with
one warning, and fails in one line naming a damaged checkpoint the user
chose. A save whose array file cannot be written prints one line, not the
hundreds of Orbax and asyncio tracebacks the failed write sets off.
"""

import json
import shutil
import subprocess
import sys

import pytest

from midog_jax import detect
from midog_jax.data import dataset
from midog_jax.detection import detector
from midog_jax.training import checkpoints
from tests.helpers import ROOT, env_without_accelerators
from tests.train_fixtures import network_flags


def _truncate_arrays(step_dir):
  """Cuts the largest array file of a step to half, as a disk fault or a bad copy would."""
  files = [p for p in (step_dir / "state" / "ocdbt.process_0" / "d").iterdir()]
  biggest = max(files, key=lambda p: p.stat().st_size)
  with open(biggest, "r+b") as f:
    f.truncate(biggest.stat().st_size // 2)


@pytest.fixture
def damaged_run(plan_runs, tmp_path):
  """(a copy of a trained run whose best checkpoint is damaged, that step, the other step)."""
  run = tmp_path / "run"
  shutil.copytree(plan_runs / "all_domains" / "fold0", run)  # The other tests' runs stay intact.
  ckpt = checkpoints.RunCheckpoints(str(run), read_only=True)
  best, steps = ckpt.best_step(), ckpt.steps()
  if len(steps) == 1:
    # The last epoch was strictly the best, so the first was discarded: a copy
    # of it with a lower AP stands in as the older, worse step.
    older = run / "checkpoints" / str(best - 1)
    shutil.copytree(run / "checkpoints" / str(best), older)
    meta = dict(ckpt.meta(best), step=best - 1, valid_ap=ckpt.meta(best)["valid_ap"] - 1)
    (older / "meta" / "metadata").write_text(json.dumps(meta))
    steps = ckpt.steps()
  assert best is not None and len(steps) == 2 and ckpt.best_step() == best
  _truncate_arrays(run / "checkpoints" / str(best))
  return run, best, next(s for s in steps if s != best)


def test_detect_passes_a_damaged_best_checkpoint_by(damaged_run, synthetic_data_dir, tmp_path,
                                                   capsys):
  run, best, other = damaged_run
  out = tmp_path / "pred.json"
  code = detect.main(["--workdir", str(run), "--split", "test", "--data-dir", synthetic_data_dir,
                      "--out", str(out)])
  err = capsys.readouterr().err
  assert code == 0, err
  [warning] = [line for line in err.splitlines() if line.startswith("warning:")]
  assert warning.startswith(f"warning: {run / 'checkpoints' / str(best)} cannot be read (")
  assert warning.endswith(f"step {other}, the best intact step, is used instead")
  assert "Traceback" not in err
  test_cases = dataset.read_cases(synthetic_data_dir, "test")
  assert sorted(json.loads(out.read_text())) == sorted(c.file_name for c in test_cases)
  # Detection may read a run that trains: it renames nothing.
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted([str(best), str(other)])
  assert detector.load_run(str(run)).step == other


def test_detect_with_a_damaged_checkpoint_named_fails_in_one_line(damaged_run, synthetic_data_dir,
                                                                  tmp_path, capsys):
  run, best, _ = damaged_run
  code = detect.main(["--checkpoint", str(run / "checkpoints" / str(best)), "--split", "test",
                      "--data-dir", synthetic_data_dir, "--out", str(tmp_path / "pred.json")])
  lines = capsys.readouterr().err.strip().splitlines()
  assert code == 2
  assert len(lines) == 1, lines
  assert lines[0].startswith(f"error: {run / 'checkpoints' / str(best)} cannot be read (")
  assert "the checkpoint is damaged" in lines[0]
  assert not (tmp_path / "pred.json").exists()


# Files of at most 1 MiB for the training process: the run's small files (and the
# compilation cache's, under 0.5 MiB) are written, the checkpoint's array files
# (about 3 MiB with the tests' network) fail as on a full disk
# (EFBIG; SIGXFSZ ignored, so an error, not a kill). Set before exec, in the
# child only.
_LIMITED = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, "
            "(1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1])); "
            "os.execv(sys.executable, [sys.executable, '-m', 'midog_jax.train', *sys.argv[1:]])")


def test_a_save_that_fails_inside_tensorstore_prints_one_line(synthetic_data_dir, tmp_path):
  # A failure in TensorStore's writes, not above Orbax as fault_driver.py
  # injects it: those writes are what floods the log.
  env = env_without_accelerators()
  env.pop("XLA_FLAGS", None)  # One CPU device compiles faster.
  workdir = tmp_path / "w"
  proc = subprocess.run(
      [sys.executable, "-c", _LIMITED, "--config", str(ROOT / "configs" / "demo.py"),
       "--workdir", str(workdir), f"--config.data_dir={synthetic_data_dir}",
       "--config.patch_size=64", "--config.batch_size=4", "--config.train_patches_per_epoch=16",
       "--config.valid_patches_per_epoch=8", "--config.num_epochs=1",
       "--config.eval.every_epochs=1", "--config.eval.batch_size=8",
       "--config.eval.selection=reference", "--config.prefetch=0", *network_flags()],
      env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, proc.stderr[-3000:]
  [error] = [line for line in lines if line.startswith("error:")]
  assert error.startswith(f"error: could not save the checkpoint of step 4 in {workdir}/checkpoints (")
  assert "File too large" in error and "no earlier checkpoint exists" in error
  assert error.endswith("raise the limit or pass another --workdir")
  assert "Traceback" not in proc.stderr
  assert len(lines) < 20, proc.stderr[-3000:]
  assert not [p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
