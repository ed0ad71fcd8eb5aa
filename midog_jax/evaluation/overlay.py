"""A picture to check by eye: detections and ground truth over the image."""

from __future__ import annotations

import os
from typing import Any, Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from midog_jax import atomic  # noqa: E402
from midog_jax.detection import predictions  # noqa: E402
from midog_jax.evaluation import metrics  # noqa: E402


def write_overlay(path: str | os.PathLike[str], image: np.ndarray, det_xy: np.ndarray,
                  gt_xy: np.ndarray | None, um_per_px: float, title: str = "",
                  max_side: int = 2048, scores: np.ndarray | None = None,
                  threshold: float = 0.5) -> None:
  """A downscaled PNG with true positives, false positives and misses marked.

  Only detections scored above `threshold` are drawn (the operating point);
  without ground truth every one is drawn alike. Matching is the scorer's
  (7.5 µm, greedy in ground-truth order).
  """
  step = max(1, int(np.ceil(max(image.shape[:2]) / max_side)))
  small = image[::step, ::step]
  det_xy = np.asarray(det_xy, np.float64).reshape(-1, 2)
  if scores is not None:
    det_xy = det_xy[np.asarray(scores).reshape(-1) > threshold]
  h, w = small.shape[:2]
  fig = plt.figure(figsize=(w / 100, h / 100 + 0.4), dpi=100)
  ax = fig.add_axes([0, 0, 1, h / (h + 40)])
  ax.imshow(small)
  ax.set_axis_off()
  r = metrics.radius_px(um_per_px) / step
  # Marker size is in points²: a circle of the matching radius, in pixels.
  style = dict(s=(2 * r * 72 / fig.dpi) ** 2, facecolors="none", linewidths=1.4)
  if gt_xy is None:
    ax.scatter(det_xy[:, 0] / step, det_xy[:, 1] / step, edgecolors="yellow", **style)
    legend = f"{len(det_xy)} detections (yellow; no ground truth to colour hits and misses)"
  else:
    gt_xy = np.asarray(gt_xy, np.float64).reshape(-1, 2)
    pairs = metrics.match_pairs(gt_xy, det_xy, metrics.radius_px(um_per_px))
    hit_gt = {g for g, _ in pairs}
    hit_det = {d for _, d in pairs}
    tp = det_xy[sorted(hit_det)] if hit_det else np.zeros((0, 2))
    fp = det_xy[[i for i in range(len(det_xy)) if i not in hit_det]]
    fn = gt_xy[[i for i in range(len(gt_xy)) if i not in hit_gt]]
    for pts, colour in ((tp, "lime"), (fp, "red"), (fn, "cyan")):
      ax.scatter(pts[:, 0] / step, pts[:, 1] / step, edgecolors=colour, **style)
    legend = f"TP (green) {len(tp)}  FP (red) {len(fp)}  missed (cyan) {len(fn)}"
  fig.text(0.01, 1 - 0.3 / (h / 100 + 0.4), f"{title}   score > {threshold:.2f}   {legend}",
           fontsize=9, va="center")
  atomic.write_figure(path, fig)
  plt.close(fig)


def write_case_overlays(folder: str, rois: Iterable[tuple[Any, np.ndarray]],
                        predictions_path: str, threshold: float) -> list[str]:
  """One overlay PNG per (case, image) of `rois` with its detections in a MIDOG
  prediction file and its ground truth; returns the paths written."""
  os.makedirs(folder, exist_ok=True)
  found = predictions.read_predictions(predictions_path)  # In mm: every image of the file.
  paths = []
  for case, image in rois:
    path = os.path.join(folder, os.path.splitext(case.file_name)[0] + ".png")
    d = found[case.file_name]
    write_overlay(path, image, predictions.mm_to_px(d.xy, case.um_per_px), case.mitotic_figures,
                  case.um_per_px, title=case.file_name, scores=d.scores, threshold=threshold)
    paths.append(path)
  return paths
