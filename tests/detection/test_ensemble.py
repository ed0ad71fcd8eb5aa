"""Ensembles: fusion on known detections, copies of one model, vmapped members."""

import numpy as np
import pytest

from midog_jax.detection import detector
from midog_jax.detection import ensemble


def test_fusion_averages_over_members_with_zero_for_a_member_that_missed():
  a_xy, a_s = np.array([[100.0, 100.0], [300.0, 50.0]]), np.array([0.9, 0.6])
  b_xy, b_s = np.array([[110.0, 100.0], [500.0, 500.0]]), np.array([0.7, 0.8])
  xy, scores = ensemble.fuse([a_xy, b_xy], [a_s, b_s], radius=25.0)
  # (100,100)+(110,100): (0.9+0.7)/2 at the score-weighted mean; the others alone: s/2.
  np.testing.assert_allclose(scores, [0.8, 0.4, 0.3])
  np.testing.assert_allclose(xy, [[(100 * 0.9 + 110 * 0.7) / 1.6, 100.0], [500, 500], [300, 50]])


def test_fusion_takes_one_detection_per_member_and_counts_a_distance_equal_to_the_radius():
  xy = np.array([[0.0, 0.0], [25.0, 0.0], [10.0, 0.0]])
  xy_fused, scores = ensemble.fuse([xy], [np.array([0.9, 0.8, 0.7])], radius=25.0)
  # One member: its own detections each alone (a member never fuses with itself).
  assert len(scores) == 3
  xy_fused, scores = ensemble.fuse([xy[:1], xy[1:2]], [np.array([0.9]), np.array([0.8])], 25.0)
  np.testing.assert_allclose(scores, [0.85])


def test_fusion_of_identical_members_is_the_member():
  rng = np.random.default_rng(0)
  xy = rng.uniform(0, 1000, (40, 2))
  scores = rng.uniform(0.5, 1.0, 40)
  fused_xy, fused = ensemble.fuse([xy] * 3, [scores] * 3, radius=1.0)
  order = np.argsort(-scores, kind="stable")
  np.testing.assert_allclose(fused, scores[order], rtol=1e-12)
  np.testing.assert_allclose(fused_xy, xy[order], rtol=1e-12)


@pytest.fixture(scope="module")
def two_folds(plan_runs):
  return [detector.load_run(str(plan_runs / "all_domains" / f"fold{k}")) for k in (0, 1)]


@pytest.mark.parametrize("members_by", ("vmap", "map"))
def test_stacked_members_equal_each_member_alone_and_copies_equal_the_model(two_folds,
                                                                            members_by):
  image = np.random.default_rng(1).integers(0, 256, (150, 170, 3), np.uint8)
  members = ensemble.EnsembleDetector(two_folds, threshold=0.0,
                                      members_by=members_by).member_detections(image)
  for run, (xy, scores) in zip(two_folds, members):
    xy1, scores1 = detector.Detector(run, threshold=0.0)(image)
    assert len(scores1) > 0
    # vmap batches the members' convolutions: equal up to float32 rounding.
    np.testing.assert_allclose(scores, scores1, atol=1e-5)
    np.testing.assert_allclose(xy, xy1, atol=1e-3)
  if members_by == "vmap":
    return
  xy, scores = ensemble.EnsembleDetector([two_folds[0]] * 3, threshold=0.0)(image)
  xy1, scores1 = detector.Detector(two_folds[0], threshold=0.0)(image)
  np.testing.assert_allclose(scores, scores1, atol=1e-5)
  np.testing.assert_allclose(xy, xy1, atol=1e-3)
