"""The reference's model-selection metric on hand-made patches."""

import numpy as np
import pytest

from midog_jax.training import selection as S


def _box(x, y, side=50.0):
  return [x, y, x + side, y + side]


def test_ground_truth_is_centres_strictly_inside_clipped():
  gt = S.ground_truth_boxes(np.array([[10, 100], [0, 50], [511.5, 300], [512, 10]]), 512)
  np.testing.assert_array_equal(gt, [[0, 75, 35, 125], [486.5, 275, 512, 325]])


def test_suppression_by_top_left_corner_inclusive_radius():
  boxes = np.array([_box(100, 100), _box(125, 100), _box(100, 125.01), _box(300, 300, 10)])
  scores = np.array([0.9, 0.8, 0.7, 0.6])
  # 25 px exactly: dropped; 25.01: kept. Far corners, other sizes: kept.
  np.testing.assert_array_equal(S.suppress_by_top_left(boxes, scores), [0, 2, 3])
  # The corner decides, not the centre: a small box at the same corner goes.
  small = np.array([_box(100, 100), _box(110, 110, 10)])
  np.testing.assert_array_equal(S.suppress_by_top_left(small, [0.9, 0.8]), [0])
  # Ties: the later box first.
  np.testing.assert_array_equal(S.suppress_by_top_left(small, [0.5, 0.5]), [1])


def test_patch_entry_threshold_skip_and_cap():
  gt = np.array([_box(0, 0)])
  assert S.patch_entry([_box(0, 0)], [0.3], gt) is None  # Strictly above 0.3.
  boxes = [_box(0, 0), _box(100, 0), _box(200, 0), _box(300, 0), _box(400, 0)]
  e = S.patch_entry(boxes, [0.9, 0.8, 0.7, 0.6, 0.5], gt)
  assert len(e.scores) == 3  # 3 x one ground-truth box.
  empty = S.patch_entry(boxes, [0.9] * 5, np.zeros((0, 4)))
  assert empty is not None and len(empty.scores) == 0 and len(empty.gt) == 0


def test_iou_uses_inclusive_pixels():
  a, b = np.array([0, 0, 9, 9.0]), np.array([5, 0, 14, 9.0])
  assert S.iou_plus_one(a, b) == pytest.approx(50 / 150)  # 36 / 126 without the +1.
  assert S.iou_plus_one(a, np.array([10, 10, 20, 20.0])) == 0.0


def test_perfect_and_skipped_patches():
  gt = np.array([_box(100, 100)])
  hit = S.patch_entry([_box(102, 98)], [0.9], gt)
  assert S.voc_ap([hit]) == 1.0
  # A patch whose detections are all <= 0.3 is skipped with its ground truth.
  missed = S.patch_entry([_box(300, 300)], [0.2], np.array([_box(300, 300)]))
  assert missed is None and S.voc_ap([hit, missed]) == 1.0
  # A patch without ground truth contributes no false positive.
  fp_only = S.patch_entry([_box(0, 0)], [0.95], np.zeros((0, 4)))
  assert S.voc_ap([fp_only, hit]) == 1.0
  assert S.voc_ap([]) == 0.0 and S.voc_ap([None, fp_only]) == 0.0


def test_hand_computed_curve_and_no_fallback_to_the_next_box():
  # Patch 1: ground truth A at (100, 100) and B at (130, 100).
  gt1 = np.array([_box(100, 100), _box(130, 100)])
  # 0.9 matches A (IoU 1). 0.8 is closer to A than to B, A is taken: a false
  # positive, although its IoU with B passes 0.3 (no fallback).
  d1 = S.PatchEntry(np.array([_box(100, 100), _box(110, 100)], float), np.array([0.9, 0.8]), gt1)
  iou_a = S.iou_plus_one(np.array(_box(110, 100)), gt1[0])
  iou_b = S.iou_plus_one(np.array(_box(110, 100)), gt1[1])
  assert iou_a > iou_b >= 0.3
  # Patch 2: ground truth C; 0.7 misses it, 0.6 finds it.
  gt2 = np.array([_box(300, 300)])
  d2 = S.PatchEntry(np.array([_box(0, 0), _box(305, 300)], float), np.array([0.7, 0.6]), gt2)
  # Sorted: 0.9 TP, 0.8 FP, 0.7 FP, 0.6 TP over 3 ground truths.
  # recall 1/3, 1/3, 1/3, 2/3; precision 1, 1/2, 1/3, 1/2 -> envelope 1 then 1/2.
  assert S.voc_ap([d1, d2]) == pytest.approx(1 / 3 * 1 + 1 / 3 * 0.5)


def _reference_by_transcription(patches, patch_size):
  """The reference's selection AP, transcribed from its two sources without this
  module: MIDOGpp's `PascalVOCMetricByDistance` (per patch: scores > 0.3, a
  patch without one skipped with its ground truth, suppression by top-left
  corner within 25 px in descending score, later box first on ties, at most
  3 x ground truth kept; ground truth the figures strictly inside, 50 px boxes
  clipped) and object_detection_fastai's `Evaluator.GetPascalVOCMetrics`
  (Padilla's: detections sorted by confidence, each matched to the best-IoU
  box of its image, IoU with +1 pixel areas, >= 0.3 and unused, else a false
  positive; every-point interpolation).

  `patches` holds (boxes [[x1, y1, x2, y2], ...], scores, centres [[x, y], ...]).
  """
  import sys
  detections, ground_truths = [], {}
  for image, (boxes, scores, centres) in enumerate(patches):
    gts = []
    for cx, cy in centres:
      if 0 < cx < patch_size and 0 < cy < patch_size:
        gts.append([max(0.0, cx - 25), max(0.0, cy - 25), min(patch_size, cx + 25),
                    min(patch_size, cy + 25)])
    candidates = [(float(sc), i) for i, sc in enumerate(scores) if sc > 0.3]
    if not candidates:
      continue
    ground_truths[image] = gts
    candidates.sort(key=lambda t: (t[0], t[1]), reverse=True)  # Later box first on ties.
    kept = []
    while candidates:
      score, i = candidates.pop(0)
      kept.append((score, i))
      x, y = boxes[i][0], boxes[i][1]
      candidates = [(sc, j) for sc, j in candidates
                    if ((boxes[j][0] - x) ** 2 + (boxes[j][1] - y) ** 2) ** 0.5 > 25]
    for score, i in kept[:3 * len(gts)]:
      detections.append((image, score, list(boxes[i])))

  def intersect(a, b):
    return not (a[0] > b[2] or b[0] > a[2] or a[3] < b[1] or a[1] > b[3])

  def iou(a, b):
    if not intersect(a, b):
      return 0.0
    inter = (min(a[2], b[2]) - max(a[0], b[0]) + 1) * (min(a[3], b[3]) - max(a[1], b[1]) + 1)
    union = ((a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
             - inter)
    return inter / union

  npos = sum(len(g) for g in ground_truths.values())
  if npos == 0 or not detections:
    return 0.0
  detections = sorted(detections, key=lambda d: d[1], reverse=True)
  used = {k: [0] * len(g) for k, g in ground_truths.items()}
  tp, fp = [0] * len(detections), [0] * len(detections)
  for d, (image, _, box) in enumerate(detections):
    iou_max, j_max = sys.float_info.min, None
    for j, g in enumerate(ground_truths[image]):
      value = iou(box, g)
      if value > iou_max:
        iou_max, j_max = value, j
    if iou_max >= 0.3 and used[image][j_max] == 0:
      tp[d], used[image][j_max] = 1, 1
    else:
      fp[d] = 1
  acc_tp, acc_fp, rec, prec = 0, 0, [], []
  for t, f in zip(tp, fp):
    acc_tp, acc_fp = acc_tp + t, acc_fp + f
    rec.append(acc_tp / npos)
    prec.append(acc_tp / (acc_tp + acc_fp))
  mrec, mpre = [0.0] + rec + [1.0], [0.0] + prec + [0.0]
  for i in range(len(mpre) - 1, 0, -1):
    mpre[i - 1] = max(mpre[i - 1], mpre[i])
  return sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in range(1, len(mrec))
             if mrec[i] != mrec[i - 1])


def test_matches_an_independent_transcription_on_random_patches():
  rng = np.random.default_rng(0)
  size = 512
  checked = 0
  for _ in range(40):
    patches = []
    for _ in range(rng.integers(1, 6)):
      centres = rng.uniform(-20, size + 20, (rng.integers(0, 5), 2))
      picked = centres[rng.integers(0, len(centres), 4)] if len(centres) else np.zeros((0, 2))
      near = np.concatenate([picked - 25, picked + 25], 1) + rng.normal(0, 12, (len(picked), 4))
      boxes = np.concatenate([near, [_box(*rng.uniform(0, 460, 2)) for _ in range(3)]])
      scores = rng.uniform(0, 1, len(boxes)).round(1)  # Ties on purpose.
      patches.append((boxes.tolist(), scores.tolist(), centres.tolist()))
    ours = S.voc_ap([S.patch_entry(np.asarray(b), np.asarray(s), S.ground_truth_boxes(
        np.asarray(c).reshape(-1, 2), size)) for b, s, c in patches])
    assert ours == pytest.approx(_reference_by_transcription(patches, size))
    checked += ours > 0
  assert checked > 10  # Most draws have matches: the comparison is not of zeros.


def _rows(values, counted=None):
  return [{"epoch": e + 1, "step": 10 * (e + 1), "valid_ap": v,
           **({} if counted is None else {"valid_figures": 2 * counted[e],
                                          "valid_figures_counted": counted[e]})}
          for e, v in enumerate(values)]


def test_a_saturated_tie_is_named_with_its_epochs_and_the_remedy():
  rows = _rows([0.4, 1.0, 0.9, 1.0, 1.0], counted=[50] * 5)
  note = S.check_choice(rows, best_step=20, name="reference")
  assert "saturated" in note and "epochs 2, 4, 5" in note and "epoch 2 was kept" in note
  assert "valid_patches_per_epoch" in note and "eval.selection=roi_ap" in note
  assert "--checkpoint last" in note and "\n" not in note
  # One epoch at 1.0 is no tie; a clear best over enough figures says nothing.
  assert S.check_choice(_rows([0.4, 1.0, 0.9], counted=[50] * 3), 20, "reference") is None
  assert S.check_choice(_rows([0.4, 0.8, 0.9], counted=[50] * 3), 30, "reference") is None


def test_too_few_counted_figures_are_named():
  rows = _rows([0.2, 0.7, 0.5], counted=[40, 3, 40])
  note = S.check_choice(rows, best_step=20, name="reference")
  assert f"over 3 mitotic figure(s) (of 6 in its validation patches), fewer than " \
         f"{S.MIN_COUNTED_FIGURES}" in note
  assert S.check_choice(_rows([0.2, 0.7], counted=[40, S.MIN_COUNTED_FIGURES]), 20, "x") is None
  # Without counts (a metric that reports none) only saturation can be judged.
  assert S.check_choice(_rows([0.2, 0.7]), 20, "toy") is None
  assert S.check_choice(_rows([0.2, 0.7]), None, "toy") is None


def test_measured_takes_floats_and_results():
  assert S.measured(0.25) == S.Measured(0.25, None, None)
  assert S.measured(S.Measured(0.5, 10, 4)).counted == 4
