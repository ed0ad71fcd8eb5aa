"""Fold ensembles of an experiment, scored on the test split beside its folds.

The five runs of an experiment (one per validation fold) make one detector
when combined as `detect --model runs/E/fold0 ... --model runs/E/fold4` does:
each member's whole-image detections, fused across members
(`detection.ensemble.fuse`), scored at the mean of the members' operating
points. The members' detections are the test predictions `eval --runs` has
just written or found in each run's cache, so an ensemble costs no detection
of its own: fused from those files it equals the ensemble detector's output
(tests/evaluation/test_runs.py checks this against `EnsembleDetector`). Every
member keeps its own stain normalisation here, which the ensemble detector
requires to be one.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np

from midog_jax import atomic
from midog_jax.detection import ensemble
from midog_jax.detection import predictions
from midog_jax.evaluation import metrics

# Fewer members than this are no ensemble.
MIN_MEMBERS = 2


def groups(evaluations: Sequence[Mapping], folds: Sequence[int]) -> dict[tuple[str, str], list]:
  """{(experiment, variant): its runs' evaluations, by fold} with at least MIN_MEMBERS
  of the requested `folds`."""
  out: dict[tuple[str, str], list] = {}
  for ev in evaluations:
    if int(ev["fold"]) in folds:
      out.setdefault((ev["experiment"], ev["variant"]), []).append(ev)
  return {k: sorted(v, key=lambda e: int(e["fold"])) for k, v in sorted(out.items())
          if len(v) >= MIN_MEMBERS}


def evaluate(members: Sequence[Mapping], root: str, test_cases, out_path: str,
             suffix: str = "") -> dict:
  """The fold ensemble of `members` (their `evaluate_run` results, with `workdir`
  relative to `root`) on the test split; writes its fused predictions to `out_path`.

  `suffix` names the checkpoint's prediction files ("" for the best).
  """
  um = {c.file_name: c.um_per_px for c in test_cases}
  found = []
  for ev in members:
    path = os.path.join(root, ev["workdir"], "predictions", f"test{suffix}.json")
    found.append(predictions.read_predictions(path, um))
  fused = {}
  for c in test_cases:
    fused[c.file_name] = ensemble.fuse([f[c.file_name].xy for f in found],
                                       [f[c.file_name].scores for f in found])
  threshold = float(np.mean([ev["threshold"] for ev in members]))
  scored = [metrics.ScoredCase(c.mitotic_figures, *fused[c.file_name], c.um_per_px)
            for c in test_cases]
  names = [c.file_name for c in test_cases]
  report = metrics.summarize(scored, [c.tumor for c in test_cases], threshold, names)
  by_domain = metrics.summarize(scored, [c.domain for c in test_cases], threshold, names)
  os.makedirs(os.path.dirname(out_path), exist_ok=True)
  predictions.write_predictions(out_path, fused, um)
  first = members[0]
  return metrics.json_safe({
      "experiment": first["experiment"], "variant": first["variant"],
      "checkpoint": first["checkpoint"], "folds": [int(ev["fold"]) for ev in members],
      "members": [ev["workdir"] for ev in members], "threshold": threshold,
      "threshold_source": "the mean of the members' thresholds",
      "test": report, "test_domains": by_domain["tumor_types"]})


def prediction_path(out_dir: str, experiment: str, variant: str, suffix: str = "") -> str:
  """Where an ensemble's fused test predictions go in the report folder."""
  name = experiment if variant == "none" else f"{experiment}.{variant}"
  return os.path.join(out_dir, "ensembles", f"{name}.test{suffix}.json")


def evaluate_all(evaluations: Sequence[Mapping], root: str, test_cases, out_dir: str,
                 folds: Sequence[int], suffix: str = "") -> list[dict]:
  """Every experiment's fold ensemble; writes `out_dir/ensembles.json` (when there is one)."""
  results = []
  for (experiment, variant), members in groups(evaluations, folds).items():
    path = prediction_path(out_dir, experiment, variant, suffix)
    result = evaluate(members, root, test_cases, path, suffix)
    results.append({**result, "predictions": os.path.relpath(path, out_dir)})
  if results:
    atomic.write_json(os.path.join(out_dir, "ensembles.json"), results)
  return results
