"""The reference's model-selection metric: Pascal VOC AP on validation patches.

The reference keeps the epoch with the best `AP-mitotic figure` of
`PascalVOCMetricByDistance` (MIDOGpp `utils/callbacks.py`, with the
Pascal VOC evaluator of object_detection_fastai). Per validation patch:

* detections whose score (max over the sigmoid class columns) is strictly
  above 0.3; a patch with none is skipped whole: its ground truth is not
  counted either;
* greedy suppression by distance: by descending score, each kept box drops
  every other box whose *top-left corner* lies within 25 px (inclusive);
* at most 3 x (ground-truth boxes of the patch) detections are kept, so a
  patch without ground truth contributes nothing.

Ground truth is the mitotic figures whose centre lies strictly inside the
patch, as 50 x 50 boxes clipped to it. Over all patches of the epoch,
detections are sorted by score (stable, in patch and suppression order),
each matched to the ground-truth box of its patch with the largest IoU
(IoU with the +1 pixel convention of that evaluator); a match needs IoU >=
0.3 and an unmatched box, else the detection is a false positive (no
fallback to the next-best box). AP is the every-point interpolated area
under the precision-recall curve, 0 when nothing was counted.
"""

from __future__ import annotations

import sys
from typing import NamedTuple, Sequence

import numpy as np

from midog_jax import annotations

SCORE_THRESHOLD = 0.3
RADIUS = 25.0
PER_GROUND_TRUTH = 3
IOU_THRESHOLD = 0.3


class PatchEntry(NamedTuple):
  """What one patch contributes: detections [D, 4] xyxy px, scores [D], gt [G, 4]."""
  boxes: np.ndarray
  scores: np.ndarray
  gt: np.ndarray


def ground_truth_boxes(centers: np.ndarray, patch_size: int) -> np.ndarray:
  """50 x 50 px boxes (xyxy) of the centres strictly inside the patch, clipped."""
  c = np.asarray(centers, np.float64).reshape(-1, 2)
  inside = (c > 0).all(1) & (c < patch_size).all(1)
  c = c[inside]
  half = annotations.BOX_SIZE / 2
  return np.clip(np.concatenate([c - half, c + half], 1), 0, patch_size)


def suppress_by_top_left(boxes: np.ndarray, scores: np.ndarray,
                         radius: float = RADIUS) -> np.ndarray:
  """Indices kept by the reference's distance suppression, by descending score.

  Distances are between top-left corners (x1, y1); a box within `radius`
  (inclusive) of a kept box is dropped. Ties in score: the later box first.
  """
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  order = list(np.argsort(np.asarray(scores), kind="stable")[::-1])
  kept = []
  while order:
    i = order.pop(0)
    kept.append(i)
    d = np.linalg.norm(boxes[order, :2] - boxes[i, :2], axis=1) if order else []
    order = [j for j, dj in zip(order, d) if dj > radius]
  return np.asarray(kept, np.int64)


def patch_entry(boxes: np.ndarray, scores: np.ndarray, gt: np.ndarray,
                threshold: float = SCORE_THRESHOLD, radius: float = RADIUS,
                per_gt: int = PER_GROUND_TRUTH) -> PatchEntry | None:
  """One patch's contribution, or None when no detection passes the threshold."""
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  scores = np.asarray(scores, np.float64).reshape(-1)
  above = scores > threshold
  if not above.any():
    return None
  boxes, scores = boxes[above], scores[above]
  kept = suppress_by_top_left(boxes, scores, radius)[:per_gt * len(gt)]
  return PatchEntry(boxes[kept], scores[kept], np.asarray(gt, np.float64).reshape(-1, 4))


def iou_plus_one(a: np.ndarray, b: np.ndarray) -> float:
  """IoU of two xyxy boxes with inclusive pixel extents (+1), as the evaluator."""
  if a[0] > b[2] or b[0] > a[2] or a[3] < b[1] or a[1] > b[3]:
    return 0.0
  inter = (min(a[2], b[2]) - max(a[0], b[0]) + 1) * (min(a[3], b[3]) - max(a[1], b[1]) + 1)
  area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
  return max(0.0, inter / (area(a) + area(b) - inter))


def voc_ap(entries: Sequence[PatchEntry | None], iou_threshold: float = IOU_THRESHOLD) -> float:
  """Every-point interpolated AP over the patches' pooled detections."""
  entries = [e for e in entries if e is not None]
  n_gt = sum(len(e.gt) for e in entries)
  dets = [(s, k, box) for k, e in enumerate(entries) for box, s in zip(e.boxes, e.scores)]
  if not dets or n_gt == 0:
    return 0.0
  dets.sort(key=lambda d: d[0], reverse=True)  # Stable: patch, then suppression order.
  taken = [np.zeros(len(e.gt), bool) for e in entries]
  tp = np.zeros(len(dets))
  for i, (_, k, box) in enumerate(dets):
    best, best_iou = -1, sys.float_info.min
    for j, g in enumerate(entries[k].gt):
      v = iou_plus_one(box, g)
      if v > best_iou:
        best, best_iou = j, v
    if best >= 0 and best_iou >= iou_threshold and not taken[k][best]:
      taken[k][best] = True
      tp[i] = 1
  ctp, cfp = np.cumsum(tp), np.cumsum(1 - tp)
  rec = np.concatenate([[0.0], ctp / n_gt, [1.0]])
  prec = np.concatenate([[0.0], ctp / (ctp + cfp), [0.0]])
  for i in range(len(prec) - 1, 0, -1):
    prec[i - 1] = max(prec[i - 1], prec[i])
  changes = np.flatnonzero(rec[1:] != rec[:-1]) + 1
  return max(0.0, float(np.sum((rec[changes] - rec[changes - 1]) * prec[changes])))
