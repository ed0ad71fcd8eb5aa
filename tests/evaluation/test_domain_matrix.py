"""Tests for the domain matrices and the paper's published tables."""

from __future__ import annotations

import csv
import math
import os
import re
import struct

import numpy as np
import pytest

from midog_jax import domains
from midog_jax.evaluation import domain_matrix as dm
from midog_jax.evaluation import paper

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
