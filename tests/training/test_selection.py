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


def test_matches_an_independent_transcription_on_random_patches():
  rng = np.random.default_rng(0)

  def reference(entries):  # Written from the description, differently.
    dets = sorted(((s, k, b) for k, e in enumerate(entries) for b, s in zip(e.boxes, e.scores)),
                  key=lambda d: -d[0])
    n = sum(len(e.gt) for e in entries)
    used, flags = set(), []
    for s, k, b in dets:
      ious = [S.iou_plus_one(b, g) for g in entries[k].gt]
      j = int(np.argmax(ious)) if ious and max(ious) > 0 else None
      ok = j is not None and ious[j] >= 0.3 and (k, j) not in used
      if ok:
        used.add((k, j))
      flags.append(ok)
    tp = np.cumsum(flags)
    recall = tp / n
    precision = tp / np.arange(1, len(flags) + 1)
    ap, prev = 0.0, 0.0
    for i, r in enumerate(recall):
      if r > prev:
        ap += (r - prev) * precision[i:].max()
        prev = r
    return ap

  for _ in range(20):
    entries = []
    for _ in range(rng.integers(1, 6)):
      gt = S.ground_truth_boxes(rng.uniform(0, 512, (rng.integers(0, 5), 2)), 512)
      near = gt[rng.integers(0, len(gt), 4)] + rng.normal(0, 12, (4, 4)) if len(gt) else np.zeros((0, 4))
      boxes = np.concatenate([near, [_box(*rng.uniform(0, 460, 2)) for _ in range(3)]])
      e = S.patch_entry(boxes, rng.uniform(0, 1, len(boxes)).round(2), gt)
      if e is not None:
        entries.append(e)
    if sum(len(e.gt) for e in entries):
      assert S.voc_ap(entries) == pytest.approx(reference(entries))
