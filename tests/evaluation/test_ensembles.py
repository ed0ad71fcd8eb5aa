"""Fold ensembles in `eval --runs`: fused from the members' predictions, shown beside the folds."""

from __future__ import annotations

import csv
import json
import os
import types

import numpy as np
import pytest

from midog_jax import domains
from midog_jax.detection import predictions
from midog_jax.evaluation import domain_experiments
from midog_jax.evaluation import domain_matrix as dm
from midog_jax.evaluation import ensembles

SLUGS = domains.TUMOR_SLUGS
LYMPH = "canine_lymphoma"


def _per_tumor(base: float) -> dict:
  return {t: {"f1": base + 0.01 * j, "ap": base + 0.02 * j, "tp": 1, "fp": 0, "fn": 0}
          for j, t in enumerate(SLUGS)}


def _fold_results(experiment: str, folds) -> list[dm.RunResult]:
  return [dm.RunResult(experiment, k, _per_tumor(0.3 + 0.1 * k)) for k in folds]


def test_the_ensemble_sits_beside_the_folds_in_every_output(tmp_path):
  results = (_fold_results("all_domains", range(5))
             + _fold_results(f"single_{LYMPH}", range(5)))
  ens = [dm.EnsembleResult("all_domains", (0, 1, 2, 3, 4), _per_tumor(0.5)),
         dm.EnsembleResult(f"single_{LYMPH}", (1, 0), _per_tumor(0.6))]  # 2 of 5 folds.
  mats = dm.matrices(results, range(5), ensembles=ens)
  full = mats["single_domain"]["f1"]["all_domains"][LYMPH]
  j = SLUGS.index(LYMPH)
  assert full.ensemble == pytest.approx(0.5 + 0.01 * j) and not full.ensemble_marked
  assert full.mean == pytest.approx(np.mean([0.3 + 0.1 * k + 0.01 * j for k in range(5)]))
  partial = mats["single_domain"]["ap"][LYMPH][LYMPH]
  assert partial.ensemble_folds == (0, 1) and partial.ensemble_marked
  assert mats["leave_one_out"]["f1"][LYMPH][LYMPH].ensemble is None

  md = dm.markdown(mats)
  section = next(s for s in md.split("## ") if s.startswith("Single-domain training: F1"))
  row = next(line for line in section.splitlines() if line.startswith("| all tumour types"))
  assert f"{full.mean:.2f} ± {full.std:.2f} · ens. {full.ensemble:.2f} |" in row
  lymph_row = next(line for line in section.splitlines()
                   if line.startswith(f"| {domains.tumor_type(LYMPH).display} |"))
  assert lymph_row.count(f"ens. ") == len(SLUGS)
  assert lymph_row.count(dm.INCOMPLETE) == len(SLUGS)  # The folds are complete, the ensemble not.
  assert "ens.: the fold ensemble on the test split" in section
  assert "of folds 0, 1 only" in section
  assert "ens." not in next(s for s in md.split("## ") if s.startswith("Leave-one-out training: F1"))

  dm.write_csv(mats, str(tmp_path / "m.csv"))
  with open(tmp_path / "m.csv", encoding="utf-8") as f:
    rows = {(r["matrix"], r["metric"], r["train"], r["test"]): r for r in csv.DictReader(f)}
  r = rows[("single_domain", "f1", "all_domains", LYMPH)]
  assert float(r["ensemble"]) == pytest.approx(full.ensemble)
  assert r["ensemble_folds"] == "0;1;2;3;4"
  assert rows[("single_domain", "ap", LYMPH, LYMPH)]["ensemble_folds"] == "0;1"
  assert rows[("leave_one_out", "f1", LYMPH, LYMPH)]["ensemble"] == ""
  # The heatmap, with the paper's values too, holds one "ens." text per cell that has one.
  import matplotlib.axes  # pylint: disable=g-import-not-at-top
  texts = []
  real_text = matplotlib.axes.Axes.text
  def record(self, x, y, s, *args, **kwargs):
    texts.append(s)
    return real_text(self, x, y, s, *args, **kwargs)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(matplotlib.axes.Axes, "text", record)
    dm.plot_matrix(mats, "single_domain", "f1", str(tmp_path / "m.png"), compare_paper=True)
  assert sum(t.startswith("ens. ") for t in texts) == 2 * len(SLUGS)
  assert sum(t.startswith("ens. ") and t.endswith(dm.INCOMPLETE) for t in texts) == len(SLUGS)
  with pytest.raises(ValueError, match="two ensembles of all_domains"):
    dm.matrices(results, range(5), ensembles=ens + ens[:1])


def test_domain_experiments_show_their_ensembles(tmp_path):
  per_domain = lambda base: {d: {"f1": base, "ap": base + 0.1, "tp": 1, "fp": 0, "fn": 0}
                             for d in domains.DOMAIN_IDS}
  results = [dm.RunResult("domains_1a+1b", k, {}, per_domain(0.2 + 0.1 * k), "macenko")
             for k in (0, 1)]
  ens = [dm.EnsembleResult("domains_1b+1a", (0, 1), {}, per_domain(0.7), "macenko")]
  mats = domain_experiments.domain_matrices(results, (0, 1), ensembles=ens)
  c = mats["f1"][("1a+1b", "macenko")]["1c"]
  assert c.ensemble == pytest.approx(0.7) and c.mean == pytest.approx(0.25)
  assert domain_experiments.switch_table(mats)["f1"][("1a+1b", "1c")]["macenko"] is c
  domain_experiments.write_domain_report(results, str(tmp_path), (0, 1), ensembles=ens)
  with open(tmp_path / "domain_experiments.csv", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  held = next(r for r in rows if (r["table"], r["metric"], r["test"]) == ("held_out", "ap", "1c"))
  assert float(held["ensemble"]) == pytest.approx(0.8) and held["ensemble_folds"] == "0;1"
  md = (tmp_path / "domain_experiments.md").read_text(encoding="utf-8")
  assert "0.25 ± 0.05 · ens. 0.70" in md


def test_groups_need_two_requested_folds_of_one_variant():
  evs = [{"experiment": e, "variant": v, "fold": k, "workdir": f"{e}-{v}/fold{k}"}
         for e, v, k in [("all_domains", "none", 1), ("all_domains", "none", 0),
                         ("all_domains", "none", 4), ("all_domains", "macenko", 0),
                         ("single_canine_lymphoma", "none", 0),
                         ("single_canine_lymphoma", "none", 3)]]
  got = ensembles.groups(evs, folds=(0, 1, 2))
  assert list(got) == [("all_domains", "none")]  # Fold 4 and 3 not requested; one macenko fold.
  assert [e["fold"] for e in got[("all_domains", "none")]] == [0, 1]


def _case(name, figures, tumor="canine_lymphoma", domain="7", um=0.25):
  return types.SimpleNamespace(file_name=name, um_per_px=um, tumor=tumor, domain=domain,
                               mitotic_figures=np.asarray(figures, np.float64).reshape(-1, 2))


def test_an_ensemble_fuses_its_members_and_scores_at_their_mean_threshold(tmp_path):
  """Known detections, counted by hand: both members find figure (100, 100); only
  member a scores a false detection (0.9 alone fuses to 0.45, under the mean
  threshold 0.6); figure (300, 300) is seen only by b at 0.95 (fused 0.475: missed)."""
  cases = [_case("a.tiff", [[100, 100], [300, 300]]), _case("b.tiff", [], "human_melanoma", "5")]
  um = {c.file_name: c.um_per_px for c in cases}
  found = {
      "fold0": {"a.tiff": ([[100, 100], [200, 50]], [0.9, 0.9]), "b.tiff": ([], [])},
      "fold1": {"a.tiff": ([[102, 100], [300, 300]], [0.7, 0.95]),
                "b.tiff": ([[40, 40]], [0.99])},
  }
  members = []
  for k, (name, dets) in enumerate(found.items()):
    os.makedirs(tmp_path / "runs" / "e" / name / "predictions")
    predictions.write_predictions(tmp_path / "runs" / "e" / name / "predictions" / "test.json",
                                  {f: (np.asarray(xy, float).reshape(-1, 2), np.asarray(s))
                                   for f, (xy, s) in dets.items()}, um)
    members.append({"experiment": "all_domains", "variant": "none", "checkpoint": "best",
                    "fold": k, "workdir": f"e/{name}", "threshold": (0.5, 0.7)[k]})
  out = tmp_path / "report" / "ensembles" / "all_domains.test.json"
  result = ensembles.evaluate(members, str(tmp_path / "runs"), cases, str(out))
  assert result["threshold"] == pytest.approx(0.6) and result["folds"] == [0, 1]
  lymph = result["test"]["tumor_types"]["canine_lymphoma"]
  assert (lymph["tp"], lymph["fp"], lymph["fn"]) == (1, 0, 1)
  melanoma = result["test"]["tumor_types"]["human_melanoma"]
  assert (melanoma["tp"], melanoma["fp"], melanoma["fn"]) == (0, 0, 0)  # 0.495: under.
  assert result["test_domains"]["7"]["tp"] == 1
  fused = predictions.read_predictions(out, um)
  order = np.argsort(-fused["a.tiff"].scores)
  np.testing.assert_allclose(fused["a.tiff"].scores[order], [0.8, 0.475, 0.45])
  # The fused figure sits at the score-weighted mean of the two members' points.
  np.testing.assert_allclose(fused["a.tiff"].xy[order][0], [(0.9 * 100 + 0.7 * 102) / 1.6, 100])
  np.testing.assert_allclose(fused["b.tiff"].scores, [0.495])
  assert json.loads(json.dumps(result)) == result  # Strict JSON (no NaN).
