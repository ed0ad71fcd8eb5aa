"""MIDOG detection metrics: greedy point matching, pooled F1, COCO-style AP.

Follows the MIDOG++ reference scorer (`evaluation.py` of the MIDOGpp
repository, which calls `evalutils.scorers.score_detection` for F1 and
torchmetrics' COCO `MeanAveragePrecision` for AP), in pixels instead of mm:

- a detection counts when its score is strictly above the threshold;
- ground-truth points in annotation order each take the nearest not yet
  matched detection within 7.5 µm (distance equal to the radius counts);
- F1 is pooled: sum TP, FP, FN over a group's cases, F1 = 2TP/(2TP+FP+FN);
- AP uses every detection (no threshold): squares of half-side 11.25 µm,
  IoU >= 0.5, greedy by descending score, 101-point interpolated precision.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable, NamedTuple, Sequence

import numpy as np

RADIUS_UM = 7.5  # Match radius for F1.
BOX_HALF_SIDE_UM = 11.25  # Square half-side for AP; IoU 0.5 <=> 7.5 µm apart.
IOU_THRESHOLD = 0.5
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)  # COCO's 101 recall points.
# The reference sweeps np.arange(0.5, 1, 0.01); same floats here.
THRESHOLDS = np.arange(0.5, 1.0, 0.01)
_SELECT_EPS = 1e-6  # The reference's F1 smoothing, used only to pick thresholds.


class Counts(NamedTuple):
  """True positives, false positives and false negatives."""
  tp: int
  fp: int
  fn: int

  @property
  def precision(self) -> float:
    """TP / (TP + FP); 0 without detections."""
    d = self.tp + self.fp
    return self.tp / d if d else 0.0

  @property
  def recall(self) -> float:
    """TP / (TP + FN); 0 without ground truth."""
    d = self.tp + self.fn
    return self.tp / d if d else 0.0

  @property
  def f1(self) -> float:
    """2TP / (2TP + FP + FN); 1 when there is nothing to find and nothing found."""
    d = 2 * self.tp + self.fp + self.fn
    return 2 * self.tp / d if d else 1.0


def pool(counts: Iterable[Counts]) -> Counts:
  """Sums counts over cases."""
  tp = fp = fn = 0
  for c in counts:
    tp, fp, fn = tp + c.tp, fp + c.fp, fn + c.fn
  return Counts(tp, fp, fn)


def radius_px(um_per_px: float, radius_um: float = RADIUS_UM) -> float:
  """The match radius in pixels at a case's resolution."""
  return radius_um / um_per_px


def _points(a: np.ndarray | Sequence, name: str) -> np.ndarray:
  a = np.asarray(a, dtype=np.float64).reshape(-1, 2) if np.size(a) else np.zeros((0, 2))
  if not np.all(np.isfinite(a)):
    raise ValueError(f"{name}: coordinates must be finite")
  return a


def _near(gt: np.ndarray, det: np.ndarray, reach: float) -> tuple[np.ndarray, np.ndarray]:
  """(gt index, det index) pairs with |dx| <= reach and |dy| <= reach.

  Sorting detections by x once and slicing per ground-truth point is much
  faster than a tree or a dense block for few ground-truth points.
  """
  order = np.argsort(det[:, 0], kind="stable")
  xs = det[order, 0]
  lo = np.searchsorted(xs, gt[:, 0] - reach, "left")
  hi = np.searchsorted(xs, gt[:, 0] + reach, "right")
  g_idx = np.repeat(np.arange(len(gt)), hi - lo)
  d_idx = order[np.concatenate([np.arange(l, h) for l, h in zip(lo, hi)] + [np.zeros(0, np.int64)])]
  keep = np.abs(det[d_idx, 1] - gt[g_idx, 1]) <= reach
  return g_idx[keep], d_idx[keep]


def _candidates(gt: np.ndarray, det: np.ndarray, radius: float) -> list[np.ndarray]:
  """For each ground-truth point, detection indices within radius, nearest first.

  Equal distances keep the detections' order (lowest index first).
  """
  if not len(gt) or not len(det):
    return [np.zeros(0, np.int64) for _ in range(len(gt))]
  g_idx, d_idx = _near(gt, det, radius)
  dist = np.sqrt(((det[d_idx] - gt[g_idx]) ** 2).sum(-1))
  keep = dist <= radius
  g_idx, d_idx, dist = g_idx[keep], d_idx[keep], dist[keep]
  order = np.lexsort((d_idx, dist, g_idx))
  g_idx, d_idx = g_idx[order], d_idx[order]
  return np.split(d_idx, np.searchsorted(g_idx, np.arange(1, len(gt))))


def _greedy(cands: Sequence[np.ndarray], alive: np.ndarray | None = None) -> list[tuple[int, int]]:
  """Greedy assignment over nearest-first candidate lists; `alive` masks detections."""
  taken: set[int] = set()
  pairs = []
  for g, idx in enumerate(cands):
    for j in idx.tolist():
      if j not in taken and (alive is None or alive[j]):
        taken.add(j)
        pairs.append((g, j))
        break
  return pairs


def match_pairs(gt, det, radius: float) -> list[tuple[int, int]]:
  """Greedy matches as (ground-truth index, detection index) pairs.

  Ground truth in the given order takes the nearest unmatched detection with
  distance <= radius; this is not an optimal (maximum) matching.
  """
  gt, det = _points(gt, "gt"), _points(det, "det")
  return _greedy(_candidates(gt, det, radius))


def match_points(gt, det, radius: float) -> Counts:
  """(TP, FP, FN) of the greedy matching of `det` [D, 2] to `gt` [G, 2]."""
  gt, det = _points(gt, "gt"), _points(det, "det")
  tp = len(match_pairs(gt, det, radius))
  return Counts(tp, len(det) - tp, len(gt) - tp)


@dataclasses.dataclass(frozen=True)
class ScoredCase:
  """One case's ground-truth mitotic figures and scored detections, in pixels."""
  gt: np.ndarray  # [G, 2] x, y in annotation order.
  det: np.ndarray  # [D, 2] x, y.
  scores: np.ndarray  # [D]
  um_per_px: float

  def __post_init__(self):
    object.__setattr__(self, "gt", _points(self.gt, "gt"))
    object.__setattr__(self, "det", _points(self.det, "det"))
    scores = np.asarray(self.scores, np.float64).reshape(-1)
    if len(scores) != len(self.det):
      raise ValueError(f"{len(self.det)} detections but {len(scores)} scores")
    object.__setattr__(self, "scores", scores)


def case_counts(case: ScoredCase, threshold: float) -> Counts:
  """Counts of one case with detections scored strictly above `threshold`."""
  keep = case.scores > threshold
  return match_points(case.gt, case.det[keep], radius_px(case.um_per_px))


class _Sweep:
  """Per-case candidate lists computed once, re-used for every threshold."""

  def __init__(self, cases: Sequence[ScoredCase]):
    self.cases = cases
    self.cands = [_candidates(c.gt, c.det, radius_px(c.um_per_px)) for c in cases]

  def counts(self, threshold: float) -> list[Counts]:
    out = []
    for c, cands in zip(self.cases, self.cands):
      alive = c.scores > threshold
      tp = len(_greedy(cands, alive))
      out.append(Counts(tp, int(alive.sum()) - tp, len(c.gt) - tp))
    return out


def all_case_counts(cases: Sequence[ScoredCase], threshold: float) -> list[Counts]:
  """`case_counts` for every case."""
  return _Sweep(cases).counts(threshold)


def choose_threshold(cases: Sequence[ScoredCase],
                     thresholds: Sequence[float] = THRESHOLDS) -> tuple[float, float]:
  """Threshold with the best pooled F1 over `cases`; returns (threshold, F1).

  As the reference, compares (2TP + 1e-6) / (2TP + FP + FN + 1e-6) and keeps
  the first (lowest) threshold reaching the maximum.
  """
  sweep = _Sweep(cases)
  best_t, best_key, best_f1 = None, -np.inf, 0.0
  for t in thresholds:
    c = pool(sweep.counts(float(t)))
    key = (2 * c.tp + _SELECT_EPS) / (2 * c.tp + c.fp + c.fn + _SELECT_EPS)
    if key > best_key:
      best_t, best_key, best_f1 = float(t), key, c.f1
  if best_t is None:
    raise ValueError("no thresholds to choose from")
  return best_t, best_f1


def _ap_case(case: ScoredCase, iou_threshold: float,
             half_side_um: float) -> tuple[np.ndarray, np.ndarray]:
  """COCO per-image matching: (scores, is_tp) in descending-score order."""
  det, gt = case.det, case.gt
  order = np.argsort(-case.scores, kind="stable")
  ranked = case.scores[order]
  if np.any(ranked[1:] == ranked[:-1]):
    # Equal scores are ordered by position, so the result does not depend on
    # the order detections were listed in (COCO keeps input order instead).
    order = np.lexsort((det[:, 1], det[:, 0], -case.scores))
  det, scores = det[order], case.scores[order]
  is_tp = np.zeros(len(det), bool)
  if not len(gt) or not len(det):
    return scores, is_tp
  h = half_side_um / case.um_per_px
  # Squares overlap only when both |dx| and |dy| are below the side 2h.
  g_idx, d_idx = _near(gt, det, 2 * h)
  lo = np.maximum(det[d_idx] - h, gt[g_idx] - h)
  hi = np.minimum(det[d_idx] + h, gt[g_idx] + h)
  inter = np.prod(np.clip(hi - lo, 0, None), axis=-1)
  area = (2 * h) ** 2
  iou = inter / (area + area - inter)
  ok = iou >= iou_threshold
  g_idx, d_idx, iou = g_idx[ok], d_idx[ok], iou[ok]
  # Visit pairs by detection rank; within a detection by IoU, then gt index.
  pairs = np.lexsort((g_idx, iou, d_idx))
  matched = np.zeros(len(gt), bool)
  for d in np.unique(d_idx).tolist():
    sel = pairs[d_idx[pairs] == d]
    free = sel[~matched[g_idx[sel]]]
    if len(free):
      # Best IoU; among equals COCO keeps the last ground truth it saw.
      matched[g_idx[free[-1]]] = True
      is_tp[d] = True
  return scores, is_tp


def _ap_pooled(per_case: Sequence[tuple[np.ndarray, np.ndarray]], n_gt: int) -> float:
  """COCO accumulation over cases' (scores, is_tp), in case order."""
  if n_gt == 0:
    return float("nan")  # COCO reports -1 here.
  scores = np.concatenate([s for s, _ in per_case] + [np.zeros(0)])
  is_tp = np.concatenate([t for _, t in per_case] + [np.zeros(0, bool)])
  is_tp = is_tp[np.argsort(-scores, kind="mergesort")]  # Stable, as COCO.
  tp = np.cumsum(is_tp, dtype=np.float64)
  fp = np.cumsum(~is_tp, dtype=np.float64)
  recall = tp / n_gt
  precision = tp / (tp + fp + np.spacing(1))
  # Interpolate: precision at recall r is the best precision at recall >= r.
  precision = np.maximum.accumulate(precision[::-1])[::-1]
  idx = np.searchsorted(recall, RECALL_THRESHOLDS, side="left")
  q = np.zeros(len(RECALL_THRESHOLDS))
  ok = idx < len(precision)
  q[ok] = precision[idx[ok]]
  return float(q.mean())


def average_precision(cases: Sequence[ScoredCase],
                      iou_threshold: float = IOU_THRESHOLD,
                      half_side_um: float = BOX_HALF_SIDE_UM) -> float:
  """COCO AP at one IoU over `cases` pooled; NaN when they hold no ground truth.

  All detections take part (no score threshold, no per-image limit).
  """
  per_case = [_ap_case(c, iou_threshold, half_side_um) for c in cases]
  return _ap_pooled(per_case, sum(len(c.gt) for c in cases))


def summarize(cases: Sequence[ScoredCase], groups: Sequence[str],
              threshold: float, names: Sequence[str] | None = None) -> dict:
  """Per-case counts and per-group / overall precision, recall, F1 and AP.

  A metric whose denominator is zero (precision without detections, recall
  without figures, F1 with neither) is NaN: "n/a" in tables, grey in
  heatmaps, null in JSON.

  Args:
    cases: the scored cases.
    groups: one group name (tumour type) per case.
    threshold: detections count when their score is strictly above it.
    names: one name per case (file name) for the per-case table.
  """
  if len(groups) != len(cases):
    raise ValueError(f"{len(cases)} cases but {len(groups)} group names")
  names = list(names) if names is not None else [str(i) for i in range(len(cases))]
  counts = all_case_counts(cases, threshold)
  ap_parts = [_ap_case(c, IOU_THRESHOLD, BOX_HALF_SIDE_UM) for c in cases]

  def metrics(sel: Callable[[int], bool]) -> dict:
    idx = [i for i in range(len(cases)) if sel(i)]
    c = pool(counts[i] for i in idx)
    nan = float("nan")  # Undefined (0 / 0): shown as n/a, never as a score.
    return {"tp": c.tp, "fp": c.fp, "fn": c.fn,
            "precision": c.precision if c.tp + c.fp else nan,
            "recall": c.recall if c.tp + c.fn else nan,
            "f1": c.f1 if 2 * c.tp + c.fp + c.fn else nan,
            "ap": _ap_pooled([ap_parts[i] for i in idx],
                             sum(len(cases[i].gt) for i in idx))}

  return {
      "cases": {n: c._asdict() for n, c in zip(names, counts)},
      "tumor_types": {g: metrics(lambda i, g=g: groups[i] == g)
                      for g in dict.fromkeys(groups)},
      "overall": metrics(lambda i: True),
      "threshold": float(threshold),
  }


def json_safe(obj):
  """NaN (AP without ground truth) -> None, recursively, for strict JSON."""
  if isinstance(obj, dict):
    return {k: json_safe(v) for k, v in obj.items()}
  if isinstance(obj, float) and math.isnan(obj):
    return None
  return obj
