"""Evaluates finished training runs on the test split, as the paper did.

For each run: detect on its validation fold and on the test split with the
best checkpoint (predictions are cached in the run and recomputed only when
the checkpoint changed), choose the threshold on the validation fold (best
pooled F1, 0.50 to 0.99), and score the test cases per tumour type and per
domain. Runs with stain switches are told apart by their `variant`; the
paper's matrices are written per variant (the paper's, "none", in the report
folder, others in a subfolder of their name), the domain experiments' in
`domain_experiments.*`. Each experiment with two or more of the requested
folds is also scored as one fold ensemble (`ensembles.py`), beside its
folds in the same matrices.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Iterator

from midog_jax import atomic
from midog_jax import console
from midog_jax.data import dataset
from midog_jax.data import roi_store
from midog_jax.detection import detector as detector_lib
from midog_jax.detection import predictions
from midog_jax.evaluation import domain_experiments
from midog_jax.evaluation import domain_matrix
from midog_jax.evaluation import ensembles as ensembles_lib
from midog_jax.evaluation import metrics
from midog_jax.training import checkpoints


def finished_runs(root: str) -> Iterator[str]:
  """Run directories under `root` whose summary says finished, sorted."""
  for dirpath, _, files in sorted(os.walk(root)):
    if "summary.json" in files and "cases.json" in files:
      with open(os.path.join(dirpath, "summary.json"), encoding="utf-8") as f:
        if json.load(f).get("status") == "finished":
          yield dirpath


def _scored(cases, found) -> list[metrics.ScoredCase]:
  return [metrics.ScoredCase(c.mitotic_figures, *found[c.file_name], c.um_per_px) for c in cases]


def _detections(run, cases, rois: roi_store.RoiCache, name: str, make_detector) -> dict:
  """{file: (xy, scores)}, from the run's cache when made by this checkpoint.

  `make_detector()` returns the run's `detector.Detector`, built only when needed.
  """
  folder = os.path.join(run.workdir, "predictions")
  path, stamp_path = os.path.join(folder, f"{name}.json"), os.path.join(folder, f"{name}.stamp.json")
  um = {c.file_name: c.um_per_px for c in cases}
  stamp = _stamp(run, cases)
  if os.path.exists(stamp_path) and os.path.exists(path):
    try:
      if atomic.read_json(stamp_path) == stamp:
        cached = predictions.read_predictions(path, um)
        if set(cached) == set(um):
          return {k: (v.xy, v.scores) for k, v in cached.items()}
    except (ValueError, predictions.PredictionError):
      pass  # A damaged cache is made again.
  label = "/".join(os.path.normpath(run.workdir).split(os.sep)[-2:])  # experiment/foldK
  found = {name_: (xy, s) for name_, _, xy, s in detector_lib.detect_all(
      make_detector(), ((c.file_name, rois.get(c.case_id)) for c in cases), len(cases),
      desc=f"detect {label} {name}")}
  os.makedirs(folder, exist_ok=True)
  predictions.write_predictions(path, found, um)
  atomic.write_json(stamp_path, stamp)  # After the predictions: a kill between leaves no stamp.
  return found


def _stamp(run, cases) -> dict:
  """What the cached predictions depend on: the checkpoint (step and commit
  time), the detection settings and the cases."""
  committed = os.path.join(run.workdir, "checkpoints", str(run.step))
  c = run.config
  return {"step": run.step, "committed_ns": os.stat(committed).st_mtime_ns,
          "patch_size": c.patch_size, "model": c.model.to_dict(), "eval": {
              k: c.eval[k] for k in ("score_threshold", "max_detections_per_window")},
          "normalization": run.normalization.to_json(),
          "cases": [[x.file_name, x.record.shard, x.record.offset] for x in cases],
          # Only with a stain switch: stamps of other runs stay valid.
          **({"stain": run.normalization.stain.to_json()}
             if run.normalization.stain is not None else {})}


def variant(config) -> str:
  """The run's stain switches as a name: "none" (the paper's), or e.g.
  "macenko", "hed_light", "randstainna_lab", "macenko+hed_strong"."""
  parts = []
  if config.get("stain_normalization", "none") != "none":
    parts.append(config["stain_normalization"])
  augment = config.get("augment", {})
  if augment.get("randstainna", "none") != "none":
    sigma = augment.get("randstainna_sigma", 1.0)
    parts.append(f"randstainna_{augment['randstainna']}" + ("" if sigma == 1.0 else f"_{sigma:g}"))
  parts += list(augment.get("colour", ()))
  return "+".join(parts) or "none"


# Which checkpoint of a run `eval --runs` scores: the one model selection kept
# (the paper's protocol), or the last epoch's, to see what selection did.
CHECKPOINTS = ("best", "last")


def _suffix(checkpoint: str) -> str:
  """File-name suffix of a checkpoint choice's outputs ("" for the best)."""
  return "" if checkpoint == "best" else f".{checkpoint}"


def evaluate_run(workdir: str, rois: roi_store.RoiCache, train_cases, test_cases,
                 checkpoint: str = "best") -> dict:
  """Writes and returns `workdir/evaluation.json` (`evaluation.last.json`) for one finished run.

  `train_cases` and `test_cases` are the dataset's splits (`dataset.read_cases`),
  read once for all runs: each read is a pass over every record. `checkpoint`
  is one of CHECKPOINTS.
  """
  if checkpoint not in CHECKPOINTS:
    raise ValueError(f"checkpoint {checkpoint!r}: expected one of {CHECKPOINTS}")
  if checkpoint == "last":
    ckpt = checkpoints.RunCheckpoints(workdir, read_only=True)
    step = ckpt.latest_step()
    run = detector_lib.load_run(checkpoint=os.path.join(ckpt.directory, str(step)))
  else:
    run = detector_lib.load_run(workdir)
  with open(os.path.join(workdir, "cases.json"), encoding="utf-8") as f:
    meta = json.load(f)
  valid_cases = dataset.select_cases(train_cases, file_names=meta["valid"])
  # One detector (one compilation) for both splits, and none when both are cached.
  make_detector = functools.cache(lambda: detector_lib.Detector(run))
  suffix = _suffix(checkpoint)
  valid = _detections(run, valid_cases, rois, f"valid{suffix}", make_detector)
  threshold, valid_f1 = metrics.choose_threshold(_scored(valid_cases, valid))
  test = _detections(run, test_cases, rois, f"test{suffix}", make_detector)
  scored, names = _scored(test_cases, test), [c.file_name for c in test_cases]
  report = metrics.summarize(scored, [c.tumor for c in test_cases], threshold, names)
  by_domain = metrics.summarize(scored, [c.domain for c in test_cases], threshold, names)
  result = {"experiment": meta["experiment"], "fold": meta["fold"], "checkpoint": checkpoint,
            "checkpoint_step": run.step, "variant": variant(run.config),
            "threshold": threshold, "valid_f1": valid_f1, "test": report,
            "test_domains": by_domain["tumor_types"]}  # Its groups are the domains.
  summary = atomic.read_json(os.path.join(workdir, "summary.json"))
  if summary.get("selection_warning"):
    result["selection_warning"] = summary["selection_warning"]
  atomic.write_json(os.path.join(workdir, f"evaluation{suffix}.json"), metrics.json_safe(result))
  return result


def headline(evaluation: dict) -> dict:
  """The test F1 and AP, pooled and per tumour type, of a run's `evaluation.json`."""
  test = evaluation["test"]
  return {"f1_overall": test["overall"]["f1"], "ap_overall": test["overall"]["ap"],
          "f1_by_tumor_type": {t: m["f1"] for t, m in test["tumor_types"].items()},
          "ap_by_tumor_type": {t: m["ap"] for t, m in test["tumor_types"].items()},
          "threshold": evaluation["threshold"]}


def evaluate_all(root: str, out_dir: str, data_dir: str | None = None,
                 compare_paper: bool = False, folds=domain_matrix.DEFAULT_FOLDS,
                 cache_bytes: int = 16 << 30, checkpoint: str = "best") -> list[str]:
  """Evaluates every finished run under `root` (its `checkpoint`, one of
  CHECKPOINTS) and writes the domain matrices."""
  runs = list(finished_runs(root))
  if not runs:
    raise FileNotFoundError(f"{root}: no finished run (a folder with summary.json and cases.json)")
  if data_dir is None:  # The runs' own, from the first run's configuration.
    with open(os.path.join(runs[0], "config.json"), encoding="utf-8") as f:
      data_dir = json.load(f)["data_dir"]
  logging.info("Evaluating %d finished run(s) under %s; reading the cases of %s.", len(runs),
               root, data_dir)
  train_cases = dataset.read_cases(data_dir, "train")
  test_cases = dataset.read_cases(data_dir, "test")
  all_cases = {c.case_id: c for c in train_cases + test_cases}
  reader = dataset.RoiReader(data_dir)
  rois = roi_store.RoiCache(lambda i: reader(all_cases[i]), cache_bytes)
  results, evaluations = [], []
  keep = lambda groups: {g: {k: m[k] for k in ("f1", "ap", "tp", "fp", "fn")}
                         for g, m in groups.items()}
  # Even with every prediction cached, loading each run takes a second or two.
  bar = console.Progress(len(runs), "evaluated", "run", interval=10.0)
  for workdir in runs:
    ev = evaluate_run(workdir, rois, train_cases, test_cases, checkpoint)
    bar.update(1)
    if checkpoint == "best" and ev.get("selection_warning"):
      bar.write(f"warning: {os.path.relpath(workdir, root)}: {ev['selection_warning']}")
    evaluations.append({"workdir": os.path.relpath(workdir, root), **metrics.json_safe(ev)})
    results.append(domain_matrix.RunResult(ev["experiment"], ev["fold"],
                                           keep(ev["test"]["tumor_types"]),
                                           keep(ev["test_domains"]), ev["variant"]))
  bar.close()
  os.makedirs(out_dir, exist_ok=True)
  atomic.write_json(os.path.join(out_dir, "runs.json"), evaluations)
  paths = [os.path.join(out_dir, "runs.json")]
  # Fused from the predictions just written or found: no detection of their own.
  fold_ensembles = ensembles_lib.evaluate_all(evaluations, root, test_cases, out_dir, folds,
                                              _suffix(checkpoint))
  if fold_ensembles:
    paths.append(os.path.join(out_dir, "ensembles.json"))
    paths += [os.path.join(out_dir, e["predictions"]) for e in fold_ensembles]
  ensemble_results = [domain_matrix.EnsembleResult(
      e["experiment"], tuple(e["folds"]), keep(e["test"]["tumor_types"]),
      keep(e["test_domains"]), e["variant"]) for e in fold_ensembles]
  return paths + write_reports(results, out_dir, compare_paper, folds, ensemble_results)


def write_reports(results: list[domain_matrix.RunResult], out_dir: str, compare_paper: bool,
                  folds, ensembles: list[domain_matrix.EnsembleResult] = ()) -> list[str]:
  """The paper's matrices per variant and the domain experiments' matrices (each
  experiment's fold ensemble beside its folds); the paths."""
  is_domain = domain_experiments.is_domain_experiment
  by_domain = [r for r in results if is_domain(r.experiment)]
  paper_runs = [r for r in results if not is_domain(r.experiment)]
  paths = []
  if paper_runs or not by_domain:
    variants = sorted({r.variant for r in paper_runs} or {"none"}, key=lambda v: (v != "none", v))
    for name in variants:
      paths += domain_matrix.write_report(
          [r for r in paper_runs if r.variant == name],
          out_dir if name == "none" else os.path.join(out_dir, name),
          compare_paper=compare_paper, folds=folds,
          ensembles=[e for e in ensembles if e.variant == name and not is_domain(e.experiment)])
  if by_domain:
    paths += domain_experiments.write_domain_report(
        by_domain, out_dir, folds, ensembles=[e for e in ensembles if is_domain(e.experiment)])
  return paths
