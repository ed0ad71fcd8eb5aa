"""Hand-made and property tests of the MIDOG scoring rules."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.neighbors import BallTree

from midog_jax.detection import predictions as predictions_lib
from midog_jax.evaluation import metrics

UM = 0.25  # 7.5 µm = 30 px and 11.25 µm = 45 px exactly, so edges are exact.


def case(gt, det=(), scores=(), um=UM):
  return metrics.ScoredCase(np.asarray(gt, float), np.asarray(det, float),
                            np.asarray(scores, float), um)


def reference_counts(gt, det, radius):
  """The challenge's evalutils `score_detection`, for comparison."""
  if len(gt) == 0:
    return (0, len(det), 0)
  if len(det) == 0:
    return (0, 0, len(gt))
  hits = BallTree(np.asarray(det)).query_radius(np.asarray(gt), r=radius,
                                                sort_results=True, return_distance=True)[0]
  used, tp, fn = [False] * len(det), 0, 0
  for h in hits:
    for j in h:
      if not used[j]:
        used[j], tp = True, tp + 1
        break
    else:
      fn += 1
  return (tp, used.count(False), fn)


# --- Point matching ---------------------------------------------------------


def test_radius_is_7_5_um_in_pixels():
  assert metrics.radius_px(0.25) == 30.0
  assert metrics.radius_px(0.23) == pytest.approx(32.608695652)


def test_distance_equal_to_radius_counts():
  assert metrics.match_points([[0, 0]], [[18, 24]], 30.0) == (1, 0, 0)  # d = 30
  assert metrics.match_points([[0, 0]], [[30, 0]], 30.0) == (1, 0, 0)
  assert metrics.match_points([[0, 0]], [[18, 24.001]], 30.0) == (0, 1, 1)


def test_threshold_is_strict():
  c = case([[0, 0], [100, 100]], [[0, 0], [100, 100]], [0.7, 0.71])
  assert metrics.case_counts(c, 0.7) == (1, 0, 1)
  assert metrics.case_counts(c, 0.69) == (2, 0, 0)


def test_ground_truth_takes_nearest_detection():
  assert metrics.match_pairs([[0, 0]], [[20, 0], [5, 0], [10, 0]], 30) == [(0, 1)]
  # Equal distances: the first listed detection.
  assert metrics.match_pairs([[0, 0]], [[0, 10], [10, 0]], 30) == [(0, 0)]


def test_ground_truth_in_annotation_order_takes_first():
  det = [[10, 0]]
  assert metrics.match_pairs([[0, 0], [15, 0]], det, 30) == [(0, 0)]
  assert metrics.match_pairs([[15, 0], [0, 0]], det, 30) == [(0, 0)]


def test_greedy_not_optimal():
  # A optimal matching pairs A-det1 and B-det0 (2 TP). Greedy: A takes the
  # nearer det0, then B (35 px from det1) is left without a match.
  gt, det = [[0, 0], [20, 0]], [[12, 0], [-15, 0]]
  assert metrics.match_pairs(gt, det, 30) == [(0, 0)]
  assert metrics.match_points(gt, det, 30) == (1, 1, 1)


def test_empty_inputs():
  assert metrics.match_points(np.zeros((0, 2)), [[1, 1]], 30) == (0, 1, 0)
  assert metrics.match_points([[1, 1]], np.zeros((0, 2)), 30) == (0, 0, 1)
  assert metrics.match_points([], [], 30) == (0, 0, 0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 200)), max_size=12),
       st.lists(st.tuples(st.integers(0, 200), st.integers(0, 200)), max_size=15))
def test_counts_agree_with_reference_scorer(gt, det):
  gt = np.asarray(gt, float).reshape(-1, 2)
  # Distinct detections: equal distances are ordered arbitrarily by the tree.
  det = np.unique(np.asarray(det, float).reshape(-1, 2), axis=0)
  assert tuple(metrics.match_points(gt, det, 30.0)) == reference_counts(gt, det, 30.0)


# --- Pooled precision, recall, F1 ------------------------------------------


def test_f1_is_pooled_over_cases():
  a = metrics.Counts(2, 0, 0)  # F1 1
  b = metrics.Counts(0, 2, 0)  # F1 0
  pooled = metrics.pool([a, b])
  assert pooled == (2, 2, 0)
  assert pooled.f1 == pytest.approx(4 / 6)  # not the mean of per-case F1 (0.5)
  assert pooled.precision == 0.5 and pooled.recall == 1.0


def test_zero_denominators():
  assert metrics.Counts(0, 0, 0).f1 == 1.0  # nothing to find, nothing found
  assert metrics.Counts(0, 0, 0).precision == 0.0
  assert metrics.Counts(0, 0, 0).recall == 0.0
  assert metrics.Counts(0, 3, 0).f1 == 0.0
  assert metrics.Counts(0, 0, 3).f1 == 0.0


# --- Average precision ------------------------------------------------------


def ap(*cases):
  return metrics.average_precision(list(cases))


def test_ap_hand_made_ranking():
  # Ranked TP (0.9), FP (0.8), TP (0.7) over 2 ground truths: recalls .5 .5 1,
  # precisions 1 .5 2/3; 51 recall points <= .5 get 1, 50 get 2/3.
  c = case([[0, 0], [500, 0]], [[0, 0], [250, 0], [500, 0]], [0.9, 0.8, 0.7])
  assert ap(c) == pytest.approx((51 + 50 * 2 / 3) / 101)


def test_ap_101_point_interpolation():
  # 3 of 10 found at precision 1: recall 0.3 exactly, so 31 of 101 points.
  gt = [[100 * i, 0] for i in range(10)]
  c = case(gt, gt[:3], [0.9, 0.8, 0.7])
  assert ap(c) == pytest.approx(31 / 101)
  # Precision is the best at any recall >= r: FP then TP gives 0.5 everywhere.
  assert ap(case([[0, 0]], [[300, 0], [0, 0]], [0.9, 0.8])) == pytest.approx(0.5)


def test_ap_iou_half_counts():
  # Squares of side 90 px: a 30 px shift gives IoU 5400 / 10800 = 0.5 exactly.
  assert ap(case([[0, 0]], [[30, 0]], [0.9])) == pytest.approx(1.0)
  assert ap(case([[0, 0]], [[31, 0]], [0.9])) == 0.0


def test_ap_matches_by_score_then_best_iou():
  # The top detection overlaps both ground truths and takes the better one
  # (IoU .765 vs .748); the next detection only overlaps that one, so it is a
  # FP and the second ground truth is missed (an optimal matching finds both).
  c = case([[0, 0], [25, 0]], [[12, 0], [-10, 0]], [0.9, 0.8])
  assert ap(c) == pytest.approx(51 / 101)


def test_ap_equal_iou_goes_to_last_ground_truth():
  # The top detection is as close to both; COCO gives it the later one, so
  # the next detection (only near the first) is a TP too.
  c = case([[-10, 0], [10, 0]], [[0, 0], [-25, 0]], [0.9, 0.8])
  assert ap(c) == pytest.approx(1.0)


def test_ap_uses_all_detections_and_pools_cases():
  low = case([[0, 0]], [[0, 0]], [0.01])  # far below any F1 threshold
  assert ap(low) == pytest.approx(1.0)
  a = case([[0, 0]], [[0, 0]], [0.9])
  b = case([[0, 0]], [[300, 0]], [0.95])
  # Pooled ranking FP (.95), TP (.9) over 2 ground truths.
  assert ap(a, b) == pytest.approx(51 * 0.5 / 101)


def test_ap_edge_cases():
  assert ap(case([[0, 0]])) == 0.0
  assert math.isnan(ap(case([], [[0, 0]], [0.9])))
  assert math.isnan(metrics.average_precision([]))


def test_ap_scale_follows_um_per_px():
  # 40 px apart: IoU < .5 at 0.25 µm/px (45 px half-side) but >= .5 at
  # 0.125 µm/px (90 px half-side, 60 px allowed).
  assert ap(case([[0, 0]], [[40, 0]], [0.9], um=0.25)) == 0.0
  assert ap(case([[0, 0]], [[40, 0]], [0.9], um=0.125)) == pytest.approx(1.0)


# --- Threshold choice -------------------------------------------------------


def test_thresholds_are_the_reference_sweep():
  assert len(metrics.THRESHOLDS) == 50
  assert metrics.THRESHOLDS[0] == 0.5 and metrics.THRESHOLDS[-1] == pytest.approx(0.99)


def test_choose_threshold_lowest_of_equal_best():
  # F1 is 1 from 0.70 to 0.89 (the FP at 0.7 is out from 0.70 on).
  c = case([[0, 0]], [[0, 0], [300, 0]], [0.9, 0.7])
  t, f1 = metrics.choose_threshold([c])
  assert t == pytest.approx(0.70) and f1 == 1.0


def test_choose_threshold_reference_smoothing_breaks_f1_ties():
  # Exact F1 2/3 both at 0.50 (TP 2, FP 2) and from 0.57 (TP 1, FN 1); the
  # reference's (2TP + eps) / (2TP + FP + FN + eps) prefers the latter.
  c = case([[0, 0], [500, 0]], [[0, 0], [500, 0], [250, 0], [250, 250]],
           [0.9, 0.545, 0.555, 0.565])
  t, f1 = metrics.choose_threshold([c])
  assert t == pytest.approx(0.57) and f1 == pytest.approx(2 / 3)


def test_choose_threshold_pools_cases():
  a = case([[0, 0]], [[0, 0]], [0.6])  # wants t < 0.6
  b = case([[0, 0]], [[300, 0], [300, 300]], [0.55, 0.58])  # FPs up to 0.58
  # t in [.50,.55): 1 TP 2 FP; [.55,.58): 1 TP 1 FP; [.58,.60): 1 TP, F1 2/3.
  t, f1 = metrics.choose_threshold([a, b])
  assert t == pytest.approx(0.58) and f1 == pytest.approx(2 / 3)


# --- Prediction files -------------------------------------------------------


def test_mm_round_trip(tmp_path):
  path = tmp_path / "p.json"
  xy = np.array([[10.5, 20.25], [7000.0, 5000.0]])
  um = {"a.tiff": 0.23, "b.tiff": 0.25}
  predictions_lib.write_predictions(path, {"a.tiff": (xy, [0.9, 0.4]),
                                           "b.tiff": (np.zeros((0, 2)), [])}, um)
  raw = json.loads(path.read_text())
  p = raw["a.tiff"]["points"][0]
  assert p["name"] == "mitotic figure" and p["point"][2] == 0
  assert p["point"][:2] == pytest.approx([10.5 * 0.23e-3, 20.25 * 0.23e-3])
  back = predictions_lib.read_predictions(path, um)
  np.testing.assert_allclose(back["a.tiff"].xy, xy, rtol=1e-12)
  np.testing.assert_array_equal(back["a.tiff"].scores, [0.9, 0.4])
  assert back["b.tiff"].xy.shape == (0, 2)
  mm = predictions_lib.read_predictions(path)
  np.testing.assert_allclose(mm["a.tiff"].xy, xy * 0.23e-3)


def test_read_follows_reference_defaults_and_skips_unknown(tmp_path, caplog):
  path = tmp_path / "p.json"
  path.write_text(json.dumps({
      "a.tiff": {"points": [{"point": [0.001, 0.002, 0]},
                            {"name": "non-mitotic figure", "point": [0, 0, 0],
                             "probability": 0.9}]},
      "other.tiff": {"points": []}}))
  out = predictions_lib.read_predictions(path, {"a.tiff": 0.25})
  assert list(out) == ["a.tiff"]
  np.testing.assert_allclose(out["a.tiff"].xy, [[4.0, 8.0]])
  np.testing.assert_array_equal(out["a.tiff"].scores, [0.5])
  assert "other.tiff" in caplog.text


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"a.tiff": {"pts": []}}', "'a.tiff': expected an object with a 'points'"),
    ('{"a.tiff": {"points": [{"point": [1]}]}}', "points[0]: 'point'"),
    ('{"a.tiff": {"points": [{"point": [1, "x", 0]}]}}', "y 'x' is not"),
    ('{"a.tiff": {"points": [{"point": [1, 2, 0], "probability": null}]}}', "probability"),
])
def test_malformed_files_name_file_and_record(tmp_path, text, message):
  path = tmp_path / "bad.json"
  path.write_text(text)
  with pytest.raises(predictions_lib.PredictionError) as e:
    predictions_lib.read_predictions(path)
  assert str(path) in str(e.value) and message in str(e.value)


# --- Properties -------------------------------------------------------------

coords = st.tuples(st.integers(0, 300), st.integers(0, 300))


@st.composite
def scored_case(draw, perfect=False):
  gt = draw(st.lists(coords, max_size=10))
  if perfect:
    det = list(gt)
    scores = draw(st.lists(st.sampled_from([0.6, 0.8, 0.95]), min_size=len(det),
                           max_size=len(det)))
  else:
    det = draw(st.lists(coords, max_size=14))
    # Few score values, so that ties are common.
    scores = draw(st.lists(st.sampled_from([0.3, 0.6, 0.8]), min_size=len(det),
                           max_size=len(det)))
  return case(np.reshape(gt, (-1, 2)), np.reshape(det, (-1, 2)), scores)


@settings(max_examples=80, deadline=None)
@given(st.lists(scored_case(), min_size=1, max_size=3), st.randoms(use_true_random=False))
def test_ap_ignores_order_of_detections(cases, rnd):
  shuffled = []
  for c in cases:
    perm = list(range(len(c.det)))
    rnd.shuffle(perm)
    shuffled.append(case(c.gt, c.det[perm], c.scores[perm]))
  before, after = metrics.average_precision(cases), metrics.average_precision(shuffled)
  assert before == after or (math.isnan(before) and math.isnan(after))


@settings(max_examples=80, deadline=None)
@given(st.lists(scored_case(), min_size=1, max_size=3),
       st.integers(-10_000, 10_000), st.integers(-10_000, 10_000))
def test_shift_changes_nothing(cases, dx, dy):
  shifted = [case(c.gt + [dx, dy], c.det + [dx, dy], c.scores) for c in cases]
  groups = ["a", "b", "a"][:len(cases)]
  s0, s1 = (metrics.summarize(cs, groups, 0.5) for cs in (cases, shifted))
  assert s0["cases"] == s1["cases"]
  for k in ("precision", "recall", "f1", "ap"):
    a0, a1 = s0["overall"][k], s1["overall"][k]
    assert a0 == a1 or (math.isnan(a0) and math.isnan(a1))
  assert metrics.choose_threshold(cases) == metrics.choose_threshold(shifted)


@settings(max_examples=60, deadline=None)
@given(st.lists(scored_case(perfect=True), min_size=1, max_size=3))
def test_perfect_detector(cases):
  n_gt = sum(len(c.gt) for c in cases)
  s = metrics.summarize(cases, ["x"] * len(cases), 0.5)
  assert all(v["fp"] == 0 and v["fn"] == 0 for v in s["cases"].values())
  if not n_gt:  # Nothing to find, nothing found: undefined, not a perfect score.
    assert all(math.isnan(s["overall"][k]) for k in ("precision", "recall", "f1"))
  else:
    assert s["overall"]["f1"] == 1.0
    assert s["overall"]["ap"] == pytest.approx(1.0)
    assert s["overall"]["precision"] == 1.0 and s["overall"]["recall"] == 1.0
