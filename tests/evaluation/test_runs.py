"""`python -m midog_jax.eval --runs` over two trained folds of the synthetic set."""

import csv
import json
import os

import numpy as np
import pytest

from midog_jax import eval as eval_lib


@pytest.fixture(scope="module")
def report(plan_runs, synthetic_data_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("report")
  code = eval_lib.main(["--runs", str(plan_runs), "--out", str(out), "--compare-paper",
                        "--data-dir", synthetic_data_dir, "--folds", "0,1"])
  assert code == 0
  return plan_runs, out


def _f1(tp, fp, fn):
  return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None  # Undefined: null.


def test_report_files(report):
  _, out = report
  names = sorted(os.listdir(out))
  assert names == sorted(["runs.json", "domain_matrices.csv", "domain_matrices.md",
                          "single_domain_f1.png", "single_domain_ap.png",
                          "leave_one_out_f1.png", "leave_one_out_ap.png",
                          "ensembles.json", "ensembles"])  # Folds 0 and 1 of all_domains.
  assert os.listdir(out / "ensembles") == ["all_domains.test.json"]
  for n in names:
    if n.endswith(".png"):
      assert (out / n).read_bytes()[:4] == b"\x89PNG"
  md = (out / "domain_matrices.md").read_text()
  assert "all tumour types" in md and "paper 0.82 ± 0.01" in md


def test_every_number_recomputes_from_per_case_counts(report):
  runs_root, out = report
  runs = json.loads((out / "runs.json").read_text())
  assert sorted((r["experiment"], r["fold"]) for r in runs) == [("all_domains", 0),
                                                               ("all_domains", 1)]
  per_fold_f1, per_fold_ap = {}, {}
  for r in runs:
    test = r["test"]
    # Per tumour type: pooled counts of its cases -> F1.
    for t, m in test["tumor_types"].items():
      expected = _f1(m["tp"], m["fp"], m["fn"])
      assert m["f1"] == (None if expected is None else pytest.approx(expected))
      per_fold_f1.setdefault(t, []).append(m["f1"])
      per_fold_ap.setdefault(t, []).append(m["ap"])
    totals = np.sum([[c["tp"], c["fp"], c["fn"]] for c in test["cases"].values()], axis=0)
    assert [test["overall"][k] for k in ("tp", "fp", "fn")] == totals.tolist()
    assert sum(m["tp"] for m in test["tumor_types"].values()) == totals[0]
    assert 0.5 <= r["threshold"] <= 0.99
  rows = list(csv.DictReader(open(out / "domain_matrices.csv")))
  all_rows = [r for r in rows if r["matrix"] == "single_domain" and r["train"] == "all_domains"]
  assert len(all_rows) == 14  # 7 test types x (F1, AP).
  for row in all_rows:
    values = (per_fold_f1 if row["metric"] == "f1" else per_fold_ap)[row["test"]]
    values = [v for v in values if v is not None]
    assert int(row["n_folds"]) == len(values)
    if not values:  # AP of a type without test figures is undefined.
      assert row["mean"] == ""
      continue
    assert float(row["mean"]) == pytest.approx(np.mean(values))
    assert float(row["std"]) == pytest.approx(np.std(values))
    assert row["paper_mean"] != ""
  others = [r for r in rows if r["train"] != "all_domains"]
  assert others and all(r["n_folds"] == "0" and r["mean"] == "" for r in others)


def test_predictions_are_cached_per_checkpoint(report, synthetic_data_dir, tmp_path):
  runs_root, _ = report
  run = runs_root / "all_domains" / "fold0"
  stamp = run / "predictions" / "test.stamp.json"
  before = (run / "predictions" / "test.json").stat().st_mtime_ns
  assert eval_lib.main(["--runs", str(runs_root), "--out", str(tmp_path), "--data-dir",
                        synthetic_data_dir, "--folds", "0,1"]) == 0
  assert (run / "predictions" / "test.json").stat().st_mtime_ns == before
  # The same step number from another commit of the checkpoint (a run trained
  # again), or other detection settings: the cache is not used.
  for key, value in (("committed_ns", 1), ("eval", {"score_threshold": 0.5})):
    recorded = json.loads(stamp.read_text())
    stamp.write_text(json.dumps({**recorded, key: value}))
    assert eval_lib.main(["--runs", str(runs_root), "--out", str(tmp_path), "--data-dir",
                          synthetic_data_dir, "--folds", "0,1"]) == 0
    after = (run / "predictions" / "test.json").stat().st_mtime_ns
    assert after != before
    before = after
    assert json.loads(stamp.read_text()) == recorded


def test_no_runs_is_a_clean_error(tmp_path, capsys):
  assert eval_lib.main(["--runs", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
  assert "no finished run" in capsys.readouterr().err


def test_the_last_checkpoint_is_scored_beside_the_best(report, synthetic_data_dir, tmp_path):
  runs_root, out = report
  run_dir = runs_root / "all_domains" / "fold0"  # One run is enough here.
  best_text = (run_dir / "evaluation.json").read_text()
  code = eval_lib.main(["--runs", str(run_dir), "--out", str(tmp_path), "--checkpoint", "last",
                        "--data-dir", synthetic_data_dir, "--folds", "0"])
  assert code == 0
  runs = json.loads((tmp_path / "runs.json").read_text())
  assert [r["checkpoint"] for r in runs] == ["last"]
  metrics_rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
  last = json.loads((run_dir / "evaluation.last.json").read_text())
  assert last["checkpoint_step"] == metrics_rows[-1]["step"]
  best = json.loads(best_text)
  assert best["checkpoint"] == "best"
  assert (run_dir / "evaluation.json").read_text() == best_text  # The best's result stays.
  assert (run_dir / "predictions" / "test.last.json").exists()


def test_a_selection_on_too_few_figures_is_reported_by_eval(report, capsys):
  """The tiny runs select by the reference's patch AP over 8 validation patches:
  their summaries and evaluations carry the warning."""
  runs_root, out = report
  for r in json.loads((out / "runs.json").read_text()):
    assert r["selection_warning"].startswith("model selection (reference) ")
    summary = json.loads((runs_root / r["workdir"] / "summary.json").read_text())
    assert summary["selection_warning"] == r["selection_warning"]


def test_the_fold_ensemble_equals_the_ensemble_detector(report, synthetic_data_dir):
  """The report's ensemble, fused from the folds' cached predictions, scores as the
  two folds' models run together by `EnsembleDetector` (the `detect --model A
  --model B` path) on the test images."""
  from midog_jax.data import dataset
  from midog_jax.detection import detector
  from midog_jax.detection import ensemble
  from midog_jax.evaluation import metrics
  runs_root, out = report
  [ens] = json.loads((out / "ensembles.json").read_text())
  assert (ens["experiment"], ens["folds"], ens["variant"]) == ("all_domains", [0, 1], "none")
  evaluations = [json.loads((runs_root / w / "evaluation.json").read_text())
                 for w in ens["members"]]
  threshold = np.mean([e["threshold"] for e in evaluations])
  assert ens["threshold"] == pytest.approx(threshold)
  members = [detector.load_run(str(runs_root / w)) for w in ens["members"]]
  live = ensemble.EnsembleDetector(members)
  cases = dataset.read_cases(synthetic_data_dir, "test")
  scored, tumours = [], []
  for case, image in dataset.iterate_rois(synthetic_data_dir, cases):
    xy, scores = live(image)
    scored.append(metrics.ScoredCase(case.mitotic_figures, xy, scores, case.um_per_px))
    tumours.append(case.tumor)
  want = metrics.summarize(scored, tumours, threshold)
  for group in ("overall", *want["tumor_types"]):
    got_m = ens["test"] if group == "overall" else ens["test"]["tumor_types"]
    got_m = got_m["overall"] if group == "overall" else got_m[group]
    want_m = want["overall"] if group == "overall" else want["tumor_types"][group]
    assert [got_m[k] for k in ("tp", "fp", "fn")] == [want_m[k] for k in ("tp", "fp", "fn")]
    if not np.isnan(want_m["ap"]):
      assert got_m["ap"] == pytest.approx(want_m["ap"], abs=1e-9)
  rows = [r for r in csv.DictReader(open(out / "domain_matrices.csv"))
          if r["matrix"] == "single_domain" and r["train"] == "all_domains"]
  from midog_jax import domains
  by_slug = {domains.tumor_type(t).slug: m for t, m in ens["test"]["tumor_types"].items()}
  assert len(rows) == 14 and any(r["ensemble"] for r in rows)
  for row in rows:
    value = by_slug.get(row["test"], {}).get(row["metric"])
    assert row["ensemble"] == ("" if value is None else repr(float(value)))
    assert row["ensemble_folds"] == "0;1"
  assert "· ens. " in (out / "domain_matrices.md").read_text()
