"""The run-group figures: reproduce_time.py's grouped estimate, group_step.py's host side.

The group's device step itself is what tests/training/test_group.py trains
with; compiling it again here at another size would only repeat that.
"""

import pathlib
import sys

import jax
import numpy as np
import pytest

BENCHMARKS = pathlib.Path(__file__).parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
try:
  import group_step  # noqa: E402
  import reproduce_time  # noqa: E402
finally:
  sys.path.remove(str(BENCHMARKS))

RATES = ["--train-img-s", "100", "--forward-img-s", "1000", "--detect-windows-s", "500",
         "--host-patches-s", "1e6", "--compile-s", "30", "--selection-host-ms", "0"]


def test_groups_divide_the_training_time_by_their_speed_up(capsys):
  alone = reproduce_time.main(RATES)
  # Five runs together at 2.5x the images/s of one: an epoch of the group
  # trains 5 x 996 images at 250 img/s, then validates its 5 runs.
  grouped = reproduce_time.main(RATES + ["--group", "5", "--group-img-s", "250"])
  trained = 1000 // 12 * 12
  assert grouped["train_epoch"] == pytest.approx(5 * trained / 250)
  assert grouped["valid_epoch"] == pytest.approx(5 * alone["valid_epoch"])
  epoch = grouped["train_epoch"] + grouped["valid_epoch"]
  assert grouped["run"] == pytest.approx(100 * epoch + 30)
  assert grouped["training"] == pytest.approx(15 * grouped["run"])  # 75 runs in 15 groups.
  assert grouped["evaluation"] == alone["evaluation"]
  # Without a faster step a group saves only compilations (one per group).
  same = reproduce_time.main(RATES + ["--group", "5", "--group-img-s", "100"])
  assert alone["training"] - same["training"] == pytest.approx((75 - 15) * 30)
  # Each run's own validation programs, compiled in its group, count again.
  compiled = reproduce_time.main(RATES + ["--group", "5", "--group-img-s", "250",
                                          "--member-compile-s", "10"])
  assert compiled["training"] - grouped["training"] == pytest.approx(75 * 10)
  # 76 runs: a 16th group, trained as long as a full one.
  assert reproduce_time.main(RATES + ["--group", "5", "--group-img-s", "250", "--runs", "76"])[
      "training"] == pytest.approx(16 * grouped["run"])
  out = capsys.readouterr().out
  assert "run groups of 5: 250 img/s for the 5 runs together (50 per run)" in out
  assert "compile 30 s per group" in out and "per epoch of a group of 5 runs" in out


def test_the_host_side_crops_for_every_run_of_a_group():
  from midog_jax import sharding
  from midog_jax.data import input_pipeline
  cases, rois = group_step.random_inputs.random_cases(2, 256, objects=10)
  assert [c.case_id for c in cases] == [0, 1] and rois[1].shape == (256, 256, 3)
  mesh = sharding.make_mesh(jax.devices()[:1])
  pipes = [input_pipeline.PatchInput(cases, rois.__getitem__, patch_size=32, patches_per_epoch=64,
                                     global_batch_size=4, seed=k, mesh=mesh, prefetch=2,
                                     workers=1)
           for k in range(3)]
  rate = group_step.host_rate(pipes, 4)
  assert np.isfinite(rate) and rate > 0
  # Each run crops its own patches: the pipelines of a group differ by seed.
  firsts = [next(p.host_batches(0))["crops"] for p in pipes]
  assert not np.array_equal(firsts[0], firsts[1])
