"""Model selection: the per-epoch metrics a run may keep its best epoch by.

`SELECTION_METRICS` is the table `config.eval.selection` names:

* "reference": the reference's Pascal VOC AP on each epoch's freshly drawn
  validation patches (below);
* "roi_ap": the MIDOG scorer's AP on the full validation ROIs, detected with
  the sliding-window detector (so training uses detection here).

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

import dataclasses
import sys
from typing import Any, Callable, NamedTuple, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from midog_jax import sharding
from midog_jax.data import annotations
from midog_jax.data import augment
from midog_jax.data import input_pipeline
from midog_jax.data import normalization as normalization_lib
from midog_jax.data import roi_store
from midog_jax.detection import sliding_window
from midog_jax.evaluation import metrics
from midog_jax.training import steps

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


@dataclasses.dataclass(frozen=True)
class Context:
  """What a selection metric may use: the run's config and its validation fold."""
  config: ml_collections.ConfigDict
  cases: Sequence[Any]  # dataset.CaseInfo of the validation fold.
  cache: roi_store.RoiCache
  normalization: normalization_lib.Normalization
  mesh: Mesh | None
  max_objects: int  # Objects per crop the input pipeline pads to.


class Measured(NamedTuple):
  """A selection metric's value on one epoch, and the mitotic figures behind it."""
  value: float  # Higher is better.
  figures: int | None = None  # Mitotic figures in what the metric looked at.
  # Of those, the ones the value counts: the reference skips a patch without
  # a detection above 0.3 together with its figures.
  counted: int | None = None


def measured(result: Measured | float) -> Measured:
  """A metric's result as `Measured` (a metric may return a bare float)."""
  return result if isinstance(result, Measured) else Measured(float(result))


# (graphdef, train state, epoch) -> the metric (a float or `Measured`); higher is better.
Metric = Callable[[Any, Any, int], "Measured | float"]


_SELECTION_STREAM = 2  # Seeds the selection patches apart from training's.


def reference_ap(context: Context) -> Metric:
  """The reference's AP on this epoch's validation patches.

  As the reference's `PascalVOCMetricByDistance` (see above): patches
  drawn afresh each epoch by the guided sampler, detections of the centre
  patch, Pascal VOC AP at IoU 0.3 pooled over the epoch's patches.
  """
  config = context.config
  seed = int(np.random.SeedSequence(config.seed, spawn_key=(_SELECTION_STREAM,))
             .generate_state(1)[0] >> 1)
  pipe = input_pipeline.PatchInput(
      context.cases, None, patch_size=config.patch_size,
      patches_per_epoch=config.valid_patches_per_epoch, global_batch_size=config.batch_size,
      seed=seed, guided_fraction=config.guided_fraction, mesh=context.mesh, cache=context.cache, prefetch=0,
      window=config.stream_window, max_objects=context.max_objects, workers=config.input_workers)
  margin = augment.margin(config.patch_size)
  fns = {}

  def selection_ap(graphdef, state, epoch: int = 0) -> Measured:
    if "fn" not in fns:
      fns["fn"] = steps.make_patch_detector(graphdef, config, context.normalization,
                                              pipe.mesh)
    per_epoch = pipe.steps_per_epoch
    entries, figures = [], 0
    for host in pipe.host_batches(epoch * per_epoch, epochs=epoch + 1):
      boxes, scores = fns["fn"](state, pipe.to_global(host))
      boxes, scores = _all_hosts(boxes), _all_hosts(scores)
      centers, labels, valid = (_all_hosts(host[k]) for k in ("centers", "labels", "valid"))
      for b in range(len(scores)):
        mitotic = valid[b] & (labels[b] == annotations.MITOTIC_FIGURE)
        gt = ground_truth_boxes(centers[b][mitotic] - margin, config.patch_size)
        figures += len(gt)
        entries.append(patch_entry(boxes[b], scores[b], gt))
    counted = sum(len(e.gt) for e in entries if e is not None)
    return Measured(voc_ap(entries), figures, counted)

  return selection_ap


def _all_hosts(x) -> np.ndarray:
  """Every host's rows (a global array, or this host's NumPy rows), in order."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def roi_ap(context: Context) -> Metric:
  """The MIDOG scorer's AP of mitotic figures over the full validation ROIs.

  Each host detects with its own devices on every validation case, so no
  collectives are needed between hosts.
  """
  config, cases, cache = context.config, context.cases, context.cache
  local_mesh = sharding.make_mesh(jax.local_devices())
  batch = max(local_mesh.size, config.eval.batch_size // local_mesh.size * local_mesh.size)
  detectors = {}

  def validation_ap(graphdef, state, epoch: int = 0) -> Measured:
    del epoch  # The same full ROIs every epoch.
    if "fn" not in detectors:
      detectors["fn"] = sliding_window.make_detector(
          graphdef, context.normalization, config.patch_size, config.eval.max_detections_per_window,
          config.eval.score_threshold, mesh=local_mesh)
    local = jax.tree.map(lambda x: x.addressable_data(0), (state.params, state.batch_stats))
    scored = []
    for c in cases:
      xy, scores = sliding_window.detect_image(
          cache.get(c.case_id), detectors["fn"], *local, config.patch_size, batch,
          min_overlap=config.eval.window_min_overlap, progress=False)
      scored.append(metrics.ScoredCase(c.mitotic_figures, xy, scores, c.um_per_px))
    ap = metrics.average_precision(scored)
    figures = sum(len(c.mitotic_figures) for c in cases)
    return Measured(0.0 if np.isnan(ap) else ap, figures, figures)

  return validation_ap


# `config.eval.selection` -> a builder of its metric. Add an entry to select by
# another metric (README.md, "Where to add a selection metric").
SELECTION_METRICS: dict[str, Callable[[Context], Metric]] = {
    "reference": reference_ap,
    "roi_ap": roi_ap,
}


def check_name(name: str) -> None:
  """An unknown selection metric is refused with the known ones listed."""
  if name not in SELECTION_METRICS:
    raise ValueError(f"eval.selection {name!r}: expected one of {sorted(SELECTION_METRICS)}")


def make_metric(name: str, context: Context) -> Metric:
  """The selection metric `name` for a run."""
  check_name(name)
  return SELECTION_METRICS[name](context)


# Fewer counted figures than this and one hit more or less moves the recall
# by over 3 points: too few to choose a model by. Of the paper's 250
# validation patches of 512 px per epoch about 125 are drawn around a figure
# (most then hold it), so they count on the order of 100 unless the model
# misses most; the tests' tiny runs (8 patches of 64 px) count a handful.
MIN_COUNTED_FIGURES = 30
_SATURATED = 1.0 - 1e-9


def check_choice(history: Sequence[dict], best_step: int | None, name: str) -> str | None:
  """A warning when the chosen epoch says little, else None.

  `history` holds the epochs' metrics rows (`valid_ap`, and `valid_figures_counted`
  where the metric reports it). Two failures are caught: a saturated tie (the
  best value 1.0 reached by several epochs, so the earliest is kept whatever
  it detects), and a value computed from fewer than MIN_COUNTED_FIGURES figures.
  """
  scored = [r for r in history if r.get("valid_ap") is not None]
  chosen = next((r for r in scored if r["step"] == best_step), None)
  if chosen is None:
    return None
  remedy = ("raise valid_patches_per_epoch (the paper: 250 patches of 512 px) or select with "
            "--config.eval.selection=roi_ap; `python -m midog_jax.eval --runs ... --checkpoint "
            "last` scores the last epoch to compare")
  tied = [r["epoch"] for r in scored if r["valid_ap"] >= _SATURATED]
  if chosen["valid_ap"] >= _SATURATED and len(tied) > 1:
    return (f"model selection ({name}) is saturated: validation AP 1.000 at epochs "
            f"{', '.join(map(str, tied))}, so epoch {chosen['epoch']} was kept as the earliest, "
            f"whatever it detects; {remedy}")
  counted = chosen.get("valid_figures_counted")
  if counted is not None and counted < MIN_COUNTED_FIGURES:
    return (f"model selection ({name}) chose epoch {chosen['epoch']} by an AP over "
            f"{counted} mitotic figure(s) (of {chosen.get('valid_figures')} in its validation "
            f"patches), fewer than {MIN_COUNTED_FIGURES}; {remedy}")
  return None
