"""Tests for the domain matrices and the paper's published tables."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
import shutil
import struct

import numpy as np
import pytest

from configs import default
from configs import leave_one_domain_out
from midog_jax import domains
from midog_jax.data import augment
from midog_jax.data import dataset
from midog_jax.data import roi_store
from midog_jax.data import stain
from midog_jax.detection import detector
from midog_jax.evaluation import domain_experiments
from midog_jax.evaluation import domain_matrix as dm
from midog_jax.evaluation import paper
from midog_jax.evaluation import runs
from midog_jax.training import inputs
from midog_jax.training import steps
from midog_jax.training import workdir as workdir_lib
from tests.train_fixtures import use_test_network

SLUGS = domains.TUMOR_SLUGS
MAST, NEURO, LYMPH = ("canine_mast_cell_tumor", "human_neuroendocrine_tumor",
                      "canine_lymphoma")
_PAPER_TEXT = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared",
                           "seed", "midogpp_paper.txt")


def _scores(f1: float, ap: float) -> dict:
  return {"f1": f1, "ap": ap, "tp": 1, "fp": 0, "fn": 0}


def _value(run: str, fold: int, test_index: int, metric: str) -> float:
  """A distinct, known number for each run, fold, column and metric."""
  base = (sum(map(ord, run)) % 50) / 100
  return round(base + 0.1 * fold + 0.01 * test_index + (0.3 if metric == "ap" else 0), 6)


def _results(runs, folds) -> list[dm.RunResult]:
  return [dm.RunResult(run, k, {t: _scores(_value(run, k, j, "f1"),
                                           _value(run, k, j, "ap"))
                                for j, t in enumerate(SLUGS)})
          for run in runs for k in folds]


# ---------------------------------------------------------------- paper data


@pytest.mark.parametrize("matrix", paper.MATRICES)
@pytest.mark.parametrize("metric", paper.METRICS)
def test_paper_tables_complete_and_in_range(matrix, metric):
  table = paper.table(matrix, metric)
  want_rows = set(SLUGS) | ({paper.ALL_DOMAINS} if matrix == "single_domain" else set())
  assert set(table) == want_rows
  for row in table.values():
    assert set(row) == set(SLUGS)
    for v in row.values():
      assert 0.0 <= v["mean"] <= 1.0 and 0.0 <= v["std"] <= 0.2


def test_paper_table_numbers():
  assert paper.table_number("single_domain", "f1") == 4
  assert paper.table_number("single_domain", "ap") == 5
  assert paper.table_number("leave_one_out", "f1") == 6
  assert paper.table_number("leave_one_out", "ap") == 7


def test_paper_spot_checks_from_text():
  f1 = lambda r, c: paper.cell("single_domain", "f1", r, c)["mean"]
  assert f1(MAST, MAST) == 0.85  # Highest in-domain F1.
  assert f1("human melanoma", "melanoma") == 0.82  # Any spelling works.
  assert f1(NEURO, NEURO) == 0.58  # Lowest in-domain F1.
  diag = [f1(t, t) for t in SLUGS]
  assert max(diag) == 0.85 and min(diag) == 0.58
  all_row = [f1("all", t) for t in SLUGS]
  assert min(all_row) == 0.59 == f1("all_domains", NEURO)
  assert max(all_row) == 0.82 == f1("all_domains", MAST)
  # "No model was able to score an F1 score higher than 0.59" on neuroendocrine.
  assert max(f1(r, NEURO) for r in paper.rows("single_domain")) == 0.59
  # Four of six cross-domain models score worst (ties included) on lymphoma.
  worst = sum(min(f1(r, c) for c in SLUGS if c != r) == f1(r, LYMPH)
              for r in SLUGS if r != LYMPH)
  assert worst == 4
  assert paper.cell("leave_one_out", "ap", "melanoma", "melanoma") == {
      "mean": 0.61, "std": 0.04}
  assert paper.cell("single_domain", "ap", "lymphosarcoma", NEURO)["mean"] == 0.04
  assert paper.cell("leave_one_out", "f1", "all", MAST) is None


def test_paper_load_returns_a_copy():
  doc = paper.load()
  doc["tables"]["single_domain_f1"]["rows"][MAST][MAST]["mean"] = 0.0
  assert paper.cell("single_domain", "f1", MAST, MAST)["mean"] == 0.85


@pytest.mark.skipif(not os.path.exists(_PAPER_TEXT), reason="paper text absent")
def test_paper_data_matches_every_printed_row():
  cell = r"(\d\.\d\d) ± (\d\.\d\d)"
  row_re = re.compile(r"^(.*?) " + " ".join([cell] * 7) + r"\s*$")
  with open(_PAPER_TEXT, encoding="utf-8") as f:
    printed = [m for m in map(row_re.match, map(str.strip, f)) if m]
  assert len(printed) == 2 * 8 + 2 * 7
  seen = 0
  for m in printed:
    name = m.group(1)
    matrix = "leave_one_out" if name.startswith("w/o ") else "single_domain"
    vals = [float(v) for v in m.groups()[1:]]
    # F1 and AP rows of a training set are told apart by matching either.
    hits = [metric for metric in paper.METRICS if all(
        paper.cell(matrix, metric, name.removeprefix("w/o "), t) ==
        {"mean": vals[2 * j], "std": vals[2 * j + 1]} for j, t in enumerate(SLUGS))]
    assert len(hits) == 1, name
    seen += 1
  assert seen == 30


# ---------------------------------------------------------------- matrices


def test_means_and_stds_per_cell():
  runs = ["single_human_melanoma", "without_canine_lymphoma", "all_domains"]
  mats = dm.matrices(_results(runs, (0, 1)), folds=(0, 1))
  c = mats["single_domain"]["f1"]["human_melanoma"][MAST]
  j = SLUGS.index(MAST)
  a, b = (_value("single_human_melanoma", k, j, "f1") for k in (0, 1))
  assert c.folds == (0, 1) and c.complete and c.n_folds == 2
  assert c.mean == pytest.approx((a + b) / 2)
  assert c.std == pytest.approx(abs(a - b) / 2)  # ddof=0 over two folds.
  ap = mats["leave_one_out"]["ap"][LYMPH][NEURO]
  assert ap.mean == pytest.approx(np.mean(
      [_value("without_canine_lymphoma", k, SLUGS.index(NEURO), "ap") for k in (0, 1)]))
  assert mats["single_domain"]["f1"]["all_domains"][NEURO].complete
  # Every row and column exists; rows without runs are empty.
  assert list(mats["single_domain"]["f1"]) == list(SLUGS) + ["all_domains"]
  assert list(mats["leave_one_out"]["f1"]) == list(SLUGS)
  empty = mats["single_domain"]["f1"][MAST][MAST]
  assert empty.empty and empty.mean is None and empty.std is None


def test_ddof_one_is_available():
  mats = dm.matrices(_results(["single_human_melanoma"], (0, 1)), (0, 1), ddof=1)
  c = mats["single_domain"]["f1"]["human_melanoma"][SLUGS[0]]
  assert c.std == pytest.approx(np.std(c.values, ddof=1))
  one = dm.matrices(_results(["single_human_melanoma"], (0,)), (0, 1), ddof=1)
  assert one["single_domain"]["f1"]["human_melanoma"][SLUGS[0]].std is None


def test_missing_folds_are_marked_not_averaged_as_complete():
  results = _results(["single_canine_lymphoma"], (0, 2))
  # Fold 1 scored only one column; a NaN metric counts as missing too.
  results.append(dm.RunResult("single_canine_lymphoma", 1,
                              {MAST: _scores(0.5, float("nan"))}))
  mats = dm.matrices(results, folds=(0, 1, 2, 3))
  f1 = mats["single_domain"]["f1"][LYMPH]
  assert f1[MAST].folds == (0, 1, 2) and not f1[MAST].complete
  assert f1[NEURO].folds == (0, 2)
  assert mats["single_domain"]["ap"][LYMPH][MAST].folds == (0, 2)
  md = dm.markdown(mats)
  assert dm.INCOMPLETE in md
  assert "- lymphosarcoma (canine): folds 0, 2" in md
  assert "- lymphosarcoma (canine): folds 0, 1, 2 (columns cutaneous mast cell tumor (canine))" in md
  assert "| – |" in md


def test_results_outside_requested_folds_and_duplicates():
  results = _results(["all_domains"], (0, 1, 7))
  mats = dm.matrices(results, folds=(0, 1))
  assert mats["single_domain"]["f1"]["all_domains"][MAST].folds == (0, 1)
  with pytest.raises(ValueError, match="two results"):
    dm.matrices(results + _results(["all_domains"], (7,)))
  with pytest.raises(ValueError, match="unknown experiment"):
    dm.matrices([dm.RunResult("both_domains", 0, {})])


# ---------------------------------------------------------------- writers


def _png_size(path: str) -> tuple[int, int]:
  with open(path, "rb") as f:
    head = f.read(24)
  assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
  return struct.unpack(">II", head[16:24])


def test_write_report_files(tmp_path):
  runs = ["single_human_melanoma", "single_canine_lymphoma",
          "without_human_breast_carcinoma", "all_domains"]
  results = _results(runs, (0, 1))
  results = [r for r in results if not (r.experiment == "all_domains" and r.fold == 1)]
  paths = dm.write_report(results, str(tmp_path), compare_paper=True, folds=(0, 1))
  names = sorted(os.path.basename(p) for p in paths)
  assert names == sorted(["domain_matrices.csv", "domain_matrices.md"] + [
      f"{m}_{k}.png" for m in dm.MATRICES for k in dm.METRICS])

  # CSV: one row per cell, every number recomputable from the inputs.
  with open(tmp_path / "domain_matrices.csv", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  assert tuple(rows[0]) == dm.CSV_FIELDS
  assert len(rows) == 2 * (8 * 7) + 2 * (7 * 7)
  inputs = {(r.experiment, r.fold): r.per_tumor for r in results}
  checked = 0
  for row in rows:
    run = {"single_domain": f"single_{row['train']}",
           "leave_one_out": f"without_{row['train']}"}[row["matrix"]]
    run = "all_domains" if row["train"] == "all_domains" else run
    vals = [inputs[(run, k)][row["test"]][row["metric"]]
            for k in (0, 1) if (run, k) in inputs]
    assert int(row["n_folds"]) == len(vals)
    assert row["complete"] == ("0" if len(vals) == 1 else "1")
    assert row["folds"] == ";".join(str(k) for k in (0, 1) if (run, k) in inputs)
    want = paper.cell(row["matrix"], row["metric"], row["train"], row["test"])
    assert float(row["paper_mean"]) == want["mean"]
    assert float(row["paper_std"]) == want["std"]
    if vals:
      assert float(row["mean"]) == pytest.approx(np.mean(vals), abs=1e-12)
      assert float(row["std"]) == pytest.approx(np.std(vals), abs=1e-12)
      checked += 1
    else:
      assert row["mean"] == row["std"] == ""
  assert checked == 4 * 7 * 2

  md = (tmp_path / "domain_matrices.md").read_text(encoding="utf-8")
  c = dm.matrices(results, (0, 1))["single_domain"]["f1"]["human_melanoma"][MAST]
  assert f"{c.mean:.2f} ± {c.std:.2f} (paper 0.52 ± 0.08)" in md
  assert "(paper 0.85 ± 0.00)" in md  # Paper values beside empty cells too.
  assert "paper Table 7" in md and "all tumour types" in md
  assert "- all tumour types: folds 0 (all columns)" in md

  for m in dm.MATRICES:
    for k in dm.METRICS:
      path = tmp_path / f"{m}_{k}.png"
      w, h = _png_size(str(path))
      assert w > 600 and h > 600 and path.stat().st_size > 20_000


def test_incomplete_mark_is_the_same_in_every_output(tmp_path, monkeypatch):
  """Markdown, heatmap and CSV mark exactly the cells with fewer folds."""
  import matplotlib.axes  # pylint: disable=g-import-not-at-top
  results = [r for r in _results(["without_canine_lymphoma", "without_human_melanoma"],
                                 (0, 1))
             if not (r.experiment == "without_human_melanoma" and r.fold == 1)]
  mats = dm.matrices(results, (0, 1))
  grid = mats["leave_one_out"]["ap"]
  marked = {(r, t) for r, row in grid.items() for t, c in row.items() if c.marked}
  assert marked == {("human_melanoma", t) for t in SLUGS}
  # Markdown: the mark on exactly that row's cells.
  section = next(s for s in dm.markdown(mats).split("## ")
                 if s.startswith("Leave-one-out training: AP"))
  for line in section.splitlines():
    if line.startswith("| w/o"):
      n = line.count(dm.INCOMPLETE)
      assert n == (len(SLUGS) if "melanoma" in line else 0), line
  # Heatmap: the same number of marked texts.
  texts = []
  real_text = matplotlib.axes.Axes.text
  def record(self, x, y, s, *args, **kwargs):
    texts.append(s)
    return real_text(self, x, y, s, *args, **kwargs)
  monkeypatch.setattr(matplotlib.axes.Axes, "text", record)
  dm.plot_matrix(mats, "leave_one_out", "ap", str(tmp_path / "m.png"))
  assert sum(t.endswith(dm.INCOMPLETE) for t in texts) == len(marked)
  # CSV: complete = 0 on the same cells.
  dm.write_csv(mats, str(tmp_path / "m.csv"))
  with open(tmp_path / "m.csv", encoding="utf-8") as f:
    rows = [r for r in csv.DictReader(f)
            if r["matrix"] == "leave_one_out" and r["metric"] == "ap"]
  assert {(r["train"], r["test"]) for r in rows if r["complete"] == "0"} == marked


def test_png_shows_data(tmp_path):
  """The heatmap's pixels differ between a full and an empty matrix."""
  import matplotlib.image as mpimg  # pylint: disable=g-import-not-at-top
  full = dm.matrices(_results([f"without_{t}" for t in SLUGS], (0,)), (0,))
  empty = dm.matrices([], (0,))
  a = dm.plot_matrix(full, "leave_one_out", "f1", str(tmp_path / "a.png"))
  b = dm.plot_matrix(empty, "leave_one_out", "f1", str(tmp_path / "b.png"))
  img_a, img_b = mpimg.imread(a)[..., :3], mpimg.imread(b)[..., :3]
  assert img_a.shape == img_b.shape
  # Many distinct colours in the filled heatmap, and it differs from the empty one.
  assert len(np.unique(img_a.reshape(-1, 3), axis=0)) > 50
  assert np.abs(img_a - img_b).mean() > 0.02


def test_markdown_without_paper_has_no_paper_values():
  mats = dm.matrices(_results(["single_human_melanoma"], (0, 1)), (0, 1))
  md = dm.markdown(mats, compare_paper=False)
  assert "(paper 0" not in md and dm.INCOMPLETE not in md.split("## ")[1]
  assert not math.isnan(mats["single_domain"]["ap"]["human_melanoma"][NEURO].mean)


# ---------------------------------------------------------------- domain experiments


def _domain_results(rows, folds) -> list[dm.RunResult]:
  """One result per (training domains, variant) and fold, with known per-domain values."""
  out = []
  for train, variant in rows:
    for k in folds:
      per_domain = {d: _scores(_value(train + variant, k, j, "f1"),
                               _value(train + variant, k, j, "ap"))
                    for j, d in enumerate(domains.DOMAIN_IDS)}
      out.append(dm.RunResult(f"domains_{train}", k, {}, per_domain, variant))
  return out


def test_domain_matrices_and_the_held_out_table(tmp_path):
  rows = [("1a+1b", "none"), ("1a+1b", "macenko"), ("1b+1c", "none"), ("6a", "hed_light")]
  results = _domain_results(rows, (0, 1))
  results = [r for r in results if not (r.variant == "hed_light" and r.fold == 1)]
  mats = domain_experiments.domain_matrices(results, folds=(0, 1))
  assert list(mats["f1"]) == [("1a+1b", "none"), ("1a+1b", "macenko"), ("1b+1c", "none"),
                              ("6a", "hed_light")]
  c = mats["f1"][("1a+1b", "macenko")]["1c"]
  j = domains.DOMAIN_IDS.index("1c")
  want = [_value("1a+1bmacenko", k, j, "f1") for k in (0, 1)]
  assert c.folds == (0, 1) and c.mean == pytest.approx(np.mean(want))
  assert c.std == pytest.approx(np.std(want))
  assert mats["ap"][("6a", "hed_light")]["7"].marked  # Fold 1 missing.
  assert domains.parse_domain_ids("1B, 1a") == ("1a", "1b") and domains.parse_domain_ids("all") is None
  assert domains.parse_domain_set(domains.domain_set_name(["6b", "1c"])) == ("1c", "6b")
  with pytest.raises(KeyError, match="unknown domain '9z'"):
    domains.parse_domain_ids("1a,9z")
  assert domain_experiments.held_out("1a+1b") == ("1c",)
  assert domain_experiments.held_out("6a") == ("6b",)
  assert domain_experiments.held_out("1a+1b+1c+2") == ()
  table = domain_experiments.switch_table(mats)
  assert set(table["f1"]) == {("1a+1b", "1c"), ("1b+1c", "1a"), ("6a", "6b")}
  assert table["f1"][("1a+1b", "1c")]["macenko"] is c
  assert set(table["f1"][("1a+1b", "1c")]) == {"none", "macenko"}
  paths = domain_experiments.write_domain_report(results, str(tmp_path), folds=(0, 1))
  assert sorted(os.path.basename(p) for p in paths) == ["domain_experiments.csv",
                                                        "domain_experiments.md"]
  with open(tmp_path / "domain_experiments.csv", encoding="utf-8") as f:
    csv_rows = list(csv.DictReader(f))
  assert tuple(csv_rows[0]) == domain_experiments.DOMAIN_CSV_FIELDS
  held = [r for r in csv_rows if r["table"] == "held_out"]
  assert len(held) == 2 * (2 + 1 + 1)  # F1 and AP x the (training set, variant) pairs.
  row = next(r for r in held if (r["metric"], r["train"], r["variant"], r["test"])
             == ("f1", "1a+1b", "macenko", "1c"))
  assert float(row["mean"]) == pytest.approx(np.mean(want)) and row["complete"] == "1"
  assert len([r for r in csv_rows if r["table"] == "domains"]) == 2 * 4 * len(domains.DOMAIN_IDS)
  md = (tmp_path / "domain_experiments.md").read_text(encoding="utf-8")
  assert "| training domains | held-out domain | none | hed_light | macenko |" in md
  assert f"| 1a+1b | 1c | {dm.format_cell(*_mean_std([_value('1a+1bnone', k, j, 'f1') for k in (0, 1)]))}" in md
  with pytest.raises(ValueError, match="two results"):
    domain_experiments.domain_matrices(results + results[:1])


def _mean_std(values):
  return float(np.mean(values)), float(np.std(values))


def test_reports_are_split_by_variant_and_kind(tmp_path, monkeypatch):
  """Paper runs with a stain switch go to a subfolder; domain runs to their own files."""
  monkeypatch.setattr(dm, "plot_matrix", lambda mats, matrix, metric, path, *a: path)  # Fast.
  results = (_results(["all_domains"], (0,))
             + [dataclasses.replace(r, variant="hed_light")
                for r in _results(["all_domains"], (0,))]
             + _domain_results([("1a+1b", "none")], (0,)))
  paths = runs.write_reports(results, str(tmp_path), compare_paper=False, folds=(0,))
  names = {os.path.relpath(p, tmp_path) for p in paths}
  assert {"domain_matrices.csv", "hed_light/domain_matrices.csv",
          "domain_experiments.csv"} <= names
  only_domains = tmp_path / "only"
  paths = runs.write_reports(_domain_results([("1a+1b", "none")], (0,)), str(only_domains),
                             compare_paper=False, folds=(0,))
  assert sorted(os.listdir(only_domains)) == ["domain_experiments.csv", "domain_experiments.md"]
  config = {"stain_normalization": "macenko", "augment": {
      "randstainna": "lab", "randstainna_sigma": 0.5, "colour": ["hed_light"]}}
  assert runs.variant(config) == "macenko+randstainna_lab_0.5+hed_light"
  assert runs.variant({"augment": {"colour": []}}) == "none"  # A run from before the switches.


def test_a_leave_one_scanner_out_run_with_every_kind_of_switch(plan_runs, synthetic_data_dir,
                                                               tmp_path, monkeypatch):
  """A run of domains 1a and 1b with Macenko, RandStainNA and HED: its data, the
  plumbing to the device, its files; detection normalises as it trained; the report.

  The network is one of the session's tiny runs, moved into this run's files: the
  stain switches change the images it sees, not the checkpoint's shapes.
  """
  config = leave_one_domain_out.get_config("1c,macenko")
  assert (config.experiment, config.domains, config.tumor_types) == (
      "domains_1a+1b", "1a,1b", "human_breast_carcinoma")
  tiny = dict(data_dir=synthetic_data_dir, patch_size=64, batch_size=8, num_folds=2,
              train_patches_per_epoch=16, valid_patches_per_epoch=8, num_epochs=2, prefetch=0,
              cache_bytes=1 << 26, input_workers=1, decoded_dir=str(tmp_path / "decoded"))
  for k, v in tiny.items():
    config[k] = v
  config.model.body_weights = "none"
  use_test_network(config)  # The session's tiny runs' network.
  config.eval.update(batch_size=8, window_min_overlap=0)
  config.augment.update(randstainna="lab", colour=("hed_light",))
  data = inputs.build(config)
  run_stain = data.normalization.stain
  assert run_stain.normalization == "macenko" and run_stain.space == "lab"
  cases = {c.file_name: c for c in dataset.read_cases(synthetic_data_dir, "train")}
  assert {cases[n].domain for n in data.meta["train"] + data.meta["valid"]} == {"1a", "1b"}
  assert data.meta["domains"] == ["1a", "1b"]
  # Each patch carries its case's params to the device step, the run's statistics too.
  batch = next(data.train.host_batches())
  by_id = {c.case_id: c for c in cases.values()}
  for case_id, params in zip(batch["case_id"], batch["stain"]):
    stats = stain.case_statistics(dataset.RoiReader(synthetic_data_dir)(by_id[case_id]))
    np.testing.assert_allclose(params, run_stain.case_params(stats), atol=1e-6)
  seen = {}
  monkeypatch.setattr(augment, "augment_batch", lambda *a, **kw: seen.update(kw))
  steps._targets(batch, 64, data.normalization, augment.AugmentConfig.from_config(config),
                 np.float32, None)
  assert seen["stain"] is batch["stain"] and seen["config"].stain_normalization == "macenko"
  np.testing.assert_array_equal(seen["randstainna_stats"],
                                np.asarray(run_stain.distribution, np.float32))
  monkeypatch.undo()
  # The run's files: stain.json with the others; a second start finds them the same.
  # (normalization.json stays the network's own: its checkpoint was trained with it.)
  workdir = tmp_path / "runs" / "without_domain_1c" / "macenko" / "fold0"
  shutil.copytree(plan_runs / "all_domains" / "fold0", workdir)
  files = {"config.json": json.loads(config.to_json_best_effort()), **data.run_files()}
  assert files["stain.json"] == run_stain.to_json()
  del files["normalization.json"]
  for name, value in files.items():
    (workdir / name).write_text(json.dumps(value))
  assert workdir_lib.check(str(workdir), files, resume_anyway=False) == []
  # A run recorded before the switches (no such fields) resumes unchanged.
  current = json.loads(default.get_config().to_json_best_effort())
  old = {k: v for k, v in current.items() if k not in ("domains", "stain_normalization")}
  old["model"] = {k: v for k, v in current["model"].items() if k != "channels"}
  old["augment"] = {k: v for k, v in current["augment"].items() if "randstainna" not in k}
  assert workdir_lib.differences(old, current) == []
  # Detection normalises each image to the run's target, from its own estimate.
  run = detector.load_run(str(workdir))
  assert run.normalization.stain == run_stain
  test_case = next(c for c in dataset.read_cases(synthetic_data_dir, "test") if c.domain == "1c")
  image = dataset.RoiReader(synthetic_data_dir)(test_case)
  normalised = detector.Detector(run).normalize(image)
  np.testing.assert_array_equal(normalised, run_stain.normalize(image))
  assert np.abs(normalised.astype(int) - image).mean() > 1.0
  # Scored as `eval --runs` scores it (the breast test cases only, to keep it short).
  train_cases, test_cases = (dataset.read_cases(synthetic_data_dir, s) for s in ("train", "test"))
  breast = [c for c in test_cases if c.domain in ("1a", "1b", "1c")]
  reader = dataset.RoiReader(synthetic_data_dir)
  by_id = {c.case_id: c for c in train_cases + test_cases}
  rois = roi_store.RoiCache(lambda i: reader(by_id[i]), 1 << 26)
  ev = runs.evaluate_run(str(workdir), rois, train_cases, breast)
  stamp = json.loads((workdir / "predictions" / "test.stamp.json").read_text())
  assert stamp["stain"] == run_stain.to_json()  # The copied run's predictions were made again.
  assert ev["variant"] == "macenko+randstainna_lab+hed_light"
  assert set(ev["test_domains"]) == {"1a", "1b", "1c"}
  assert sum(m["tp"] for m in ev["test_domains"].values()) == ev["test"]["overall"]["tp"]
  keep = lambda groups: {g: {k: m[k] for k in ("f1", "ap", "tp", "fp", "fn")}
                         for g, m in groups.items()}
  result = dm.RunResult(ev["experiment"], ev["fold"], keep(ev["test"]["tumor_types"]),
                        keep(ev["test_domains"]), ev["variant"])
  out = tmp_path / "report"
  runs.write_reports([result], str(out), compare_paper=False, folds=(0,))
  assert sorted(os.listdir(out)) == ["domain_experiments.csv", "domain_experiments.md"]
  with open(out / "domain_experiments.csv", encoding="utf-8") as f:
    held = [r for r in csv.DictReader(f) if r["table"] == "held_out"]
  assert [(r["metric"], r["train"], r["variant"], r["test"]) for r in held] == [
      (m, "1a+1b", ev["variant"], "1c") for m in ("f1", "ap")]
  for r in held:
    value = ev["test_domains"]["1c"][r["metric"]]
    if math.isnan(value):  # Undefined (no figure, no detection): an empty cell.
      assert r["mean"] == ""
    else:
      assert float(r["mean"]) == pytest.approx(value)
