"""Scores MIDOG prediction files as the challenge does: per tumour type and pooled.

The matching and metrics are `metrics`; this module pairs a prediction file
with the annotations and formats the report (`python -m midog_jax.eval score`).
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np

from midog_jax import console
from midog_jax.data import annotations as annotations_lib
from midog_jax.detection import predictions as predictions_lib
from midog_jax.evaluation import metrics

DEFAULT_THRESHOLD = 0.5  # The reference scorer's default.


def scored_cases(cases: Sequence[annotations_lib.Case],
                 dets: dict[str, predictions_lib.Detections]) -> list[metrics.ScoredCase]:
  """Pairs cases with their detections (px); a case without any counts as empty."""
  missing = [c.file_name for c in cases if c.file_name not in dets]
  if missing:
    # The reference scorer skips such cases; counting them as empty is stricter.
    logging.warning("No predictions for %d case(s), scored as empty: %s",
                    len(missing), console.first_of(missing))
  out = []
  for c in cases:
    d = dets.get(c.file_name, predictions_lib.Detections(np.zeros((0, 2)), np.zeros(0)))
    gt = np.asarray([(o.x, o.y) for o in c.mitotic_figures], np.float64).reshape(-1, 2)
    out.append(metrics.ScoredCase(gt, d.xy, d.scores, c.um_per_px))
  return out


def score(cases: Sequence[annotations_lib.Case],
          dets: dict[str, predictions_lib.Detections],
          threshold: float) -> dict:
  """The `score --json` report for `cases`."""
  return metrics.summarize(scored_cases(cases, dets), [c.tumor for c in cases],
                           threshold, [c.file_name for c in cases])


def _fmt(v: float) -> str:
  return "  n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def format_table(report: dict) -> str:
  """A readable table of the per-tumour and overall metrics."""
  rows = list(report["tumor_types"].items()) + [("overall", report["overall"])]
  width = max(len(name) for name, _ in rows)
  head = f"{'tumour type':<{width}}  {'TP':>6} {'FP':>6} {'FN':>6}  prec   rec    F1     AP"
  lines = [f"threshold {report['threshold']:.2f}", head, "-" * len(head)]
  for name, m in rows:
    lines.append(f"{name:<{width}}  {m['tp']:>6} {m['fp']:>6} {m['fn']:>6}  "
                 f"{_fmt(m['precision'])}  {_fmt(m['recall'])}  {_fmt(m['f1'])}  {_fmt(m['ap'])}")
  return "\n".join(lines)


def check_coverage(predictions_path: str, annotations_path: str, split: str,
                   scored: Sequence[annotations_lib.Case], other_split: Sequence[str],
                   dets: dict) -> None:
  """Refuses predictions that cannot be for these annotations and split.

  Cases without predictions count as empty, which is right for a detector
  that found nothing and wrong for a file made for other annotations (the
  demo's against the real MIDOG++.json: the same file names, a table of
  zeros). Such a file has images of the other split and misses some of this
  one; a file for this split alone, or for both, passes.
  """
  missing = [c.file_name for c in scored if c.file_name not in dets]
  if other_split and missing:
    raise predictions_lib.PredictionError(
        f"{predictions_path}: holds {len(other_split)} image(s) that {annotations_path} puts "
        f"outside the {split} split ({console.first_of(other_split, 3)}) and lacks "
        f"{len(missing)} of its {len(scored)} {split} case(s) ({console.first_of(missing, 3)}): "
        "it was made for other annotations or another split; pass the annotation files it was "
        "made with (the demo's: midog_demo/data/manual/) or the right --split")


def score_file(annotations_path: str, splits_path: str, predictions_path: str, split: str = "test",
               threshold: float | None = None, choose_threshold_on: str | None = None) -> dict:
  """The report of a MIDOG prediction file on the cases of `split`.

  The threshold is `threshold`, or the one with the best pooled F1 on the
  validation predictions `choose_threshold_on`, or the reference's 0.5.
  """
  all_cases = annotations_lib.load_cases(annotations_path, splits_path)
  um = {c.file_name: c.um_per_px for c in all_cases}
  sizes = {c.file_name: (c.width, c.height) for c in all_cases}
  dets = predictions_lib.read_predictions(predictions_path, um, sizes)
  scored = [c for c in all_cases if c.split == split]
  check_coverage(predictions_path, annotations_path, split, scored,
                 [c.file_name for c in all_cases if c.split != split and c.file_name in dets], dets)
  threshold = DEFAULT_THRESHOLD if threshold is None else threshold
  if choose_threshold_on:
    val = predictions_lib.read_predictions(choose_threshold_on, um, sizes)
    val_cases = [c for c in all_cases if c.file_name in val]
    if not val_cases:
      raise predictions_lib.PredictionError(
          f"{choose_threshold_on}: no image of the annotations in it")
    threshold, _ = metrics.choose_threshold(scored_cases(val_cases, val))
  return score(scored, dets, threshold)
