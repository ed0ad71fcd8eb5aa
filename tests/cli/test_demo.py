"""`python -m midog_jax.demo` at a tiny size: same seeds, same numbers; a clean log."""

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT
from tests.train_fixtures import network_flags
from tests.cli.test_cli import NOISE, _env

# Seconds of training. The notebook's tiny path (colab/, MIDOG_NOTEBOOK_TINY) has the
# same shapes, so its test reuses the programs compiled here. Detections down to
# 0.01 so that the AP compared below is not a trivial 0.
TINY = ["--config.synthetic.cases_per_domain=3", "--config.synthetic.width=192",
        "--config.synthetic.height=160", "--config.num_epochs=2",
        "--config.train_patches_per_epoch=16", "--config.valid_patches_per_epoch=16",
        "--config.patch_size=64", "--config.eval.window_min_overlap=0",
        "--config.eval.score_threshold=0.01", "--overlays=0", *network_flags()]
TIMING = ("wall_seconds", "stage_seconds", "epoch_seconds", "train_seconds")


def _demo(workdir) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "midog_jax.demo", "--workdir", str(workdir), *TINY],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                          cwd=ROOT)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
  """Two runs side by side (much of a tiny run is single-threaded start-up)."""
  root = tmp_path_factory.mktemp("demo")
  procs = {name: _demo(root / name) for name in ("a", "b")}
  runs = []
  for name, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:]
    runs.append((root / name, subprocess.CompletedProcess(proc.args, 0, stdout, stderr)))
  return runs


def _numbers(workdir):
  """Every number the demo reports or keeps, times aside."""
  summary = json.loads((workdir / "summary.json").read_text())
  rows = [json.loads(line) for line in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
  evaluation = json.loads((workdir / "run" / "evaluation.json").read_text())
  drop = lambda d: {k: v for k, v in d.items() if k not in TIMING}  # noqa: E731
  return drop(summary), [drop(r) for r in rows], evaluation


def test_same_seeds_give_the_same_numbers(two_runs):
  (a, _), (b, _) = two_runs
  summary_a, rows_a, eval_a = _numbers(a)
  summary_b, rows_b, eval_b = _numbers(b)
  assert [r["epoch"] for r in rows_a] == [1, 2]
  assert rows_a == rows_b
  assert 0 < summary_a["ap_overall"] < 1  # Numbers worth comparing.
  assert json.dumps(eval_a) == json.dumps(eval_b)  # NaN-safe: the same text.
  assert json.dumps(summary_a) == json.dumps(summary_b)
  assert (a / "data" / "manual" / "MIDOG++.json").read_bytes() == (
      b / "data" / "manual" / "MIDOG++.json").read_bytes()


def test_the_log_is_plain_lines(two_runs):
  (_, proc), _ = two_runs
  for word in NOISE:
    assert word not in proc.stderr, word
  lines = proc.stderr.splitlines()
  # The project's information at INFO, shown by default as plain lines.
  assert any(l.startswith("all_domains fold 0: ") and "validation cases" in l for l in lines)
  # Off a terminal: one line per epoch and a last progress line with the time taken.
  assert [l.split(":")[0] for l in lines if l.startswith("epoch ")] == ["epoch 1/2", "epoch 2/2"]
  assert any(l.startswith("run: 4/4 step, loss ") and "took" in l for l in lines)
  assert "pooled test F1" in proc.stdout


def test_stage_lines_and_times_go_with_the_log_and_results_to_stdout(two_runs):
  (workdir, proc), _ = two_runs
  # Stage headers beside the training lines (stderr), so one redirected log keeps their order.
  assert [l for l in proc.stderr.splitlines() if l.startswith("== ")][0] == (
      "== 1/5 synthetic MIDOG++ (TIFFs, MIDOG++.json, datasets_xvalidation.csv)")
  assert "== " not in proc.stdout and "pooled test F1" in proc.stdout
  assert f"annotations {workdir / 'data' / 'manual' / 'MIDOG++.json'}" in proc.stdout
  summary = json.loads((workdir / "summary.json").read_text())
  assert set(summary["stage_seconds"]) == {"synthetic", "build", "training", "evaluation",
                                           "overlays"}
  assert summary["wall_seconds"] == round(sum(summary["stage_seconds"].values()), 1)
