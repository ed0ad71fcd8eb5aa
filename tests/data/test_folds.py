"""Cross-validation folds against the reference's recipe, on the real files."""

import collections
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import StratifiedKFold

from midog_jax import experiments
from midog_jax.data import annotations as ann_lib
from midog_jax.data import folds as folds_lib
from tests.helpers import (REAL_CSV, REAL_JSON, ROOT, env_without_accelerators,
                           needs_real_files)


@pytest.fixture(scope="module")
def cases():
  return ann_lib.load_cases(REAL_JSON, REAL_CSV)


@pytest.fixture(scope="module")
def raw():
  """Per train slide, straight from the files: (id, file name, CSV tumour,
  mitotic-figure count), in slide-id order."""
  with open(REAL_JSON, encoding="utf-8") as f:
    data = json.load(f)
  counts = collections.Counter(a["image_id"] for a in data["annotations"]
                               if a["category_id"] == 1)
  names = {im["id"]: im["file_name"] for im in data["images"]}
  csv = pd.read_csv(REAL_CSV, delimiter=";").sort_values("Slide")
  csv = csv[csv["Dataset"] == "train"]
  return [(s, names[s], t, counts[s]) for s, t in zip(csv["Slide"], csv["Tumor"])]


def reference_folds(raw, csv_tumors):
  """The reference's `training.py` recipe, transcribed independently."""
  files = [r for r in raw if r[2] in csv_tumors]
  bins = pd.qcut(pd.Series([r[3] for r in files]), 3, labels=False)
  skf = StratifiedKFold(n_splits=5, shuffle=True, random_state=42)
  return [([files[i][1] for i in t], [files[i][1] for i in v])
          for t, v in skf.split(files, bins)]


@needs_real_files
def test_all_partitions_the_392_train_cases(cases):
  splits = folds_lib.folds(cases, "all")
  train_names = [c.file_name for c in cases if c.split == "train"]
  assert len(splits) == 5 and len(train_names) == 392
  valid = [v for _, v in splits]
  assert sorted(len(v) for v in valid) == [78, 78, 78, 79, 79]
  assert sorted(sum(valid, [])) == sorted(train_names)  # Disjoint cover.
  test_names = {c.file_name for c in cases if c.split == "test"}
  for train, v in splits:
    assert not set(train) & set(v)
    assert not set(train) & test_names
    # The rest of the cases, in slide-id order.
    held_out = set(v)
    assert train == [n for n in train_names if n not in held_out]


@needs_real_files
def test_folds_are_stratified_on_tertiles(cases):
  chosen = folds_lib.fold_cases(cases, "all")
  bins = folds_lib.count_bins([len(c.mitotic_figures) for c in chosen])
  assert sorted(set(bins.tolist())) == [0, 1, 2]
  bin_of = {c.file_name: b for c, b in zip(chosen, bins)}
  totals = collections.Counter(bins.tolist())
  # The tertiles hold about a third each, in count order.
  assert all(120 <= totals[b] <= 140 for b in range(3))
  counts = {c.file_name: len(c.mitotic_figures) for c in chosen}
  top = [max(n for f, n in counts.items() if bin_of[f] == b) for b in range(3)]
  bottom = [min(n for f, n in counts.items() if bin_of[f] == b) for b in range(3)]
  assert top[0] < bottom[1] and top[1] < bottom[2]
  for _, valid in folds_lib.folds(cases, "all"):
    per_bin = collections.Counter(bin_of[n] for n in valid)
    for b in range(3):
      assert abs(per_bin[b] - totals[b] / 5) < 1, (b, per_bin, totals)


@needs_real_files
def test_same_as_independent_transcription(cases, raw):
  tumors = sorted({r[2] for r in raw})
  assert len(tumors) == 7
  experiments_ = [("all", tumors)]
  experiments_ += [(t, [t]) for t in tumors]  # Single domain.
  experiments_ += [(",".join(u for u in tumors if u != t),
                    [u for u in tumors if u != t]) for t in tumors]  # LOO.
  for spec, csv_tumors in experiments_:
    assert folds_lib.folds(cases, spec) == reference_folds(raw, csv_tumors), spec


@needs_real_files
def test_single_type_and_spellings(cases):
  lymphoma = folds_lib.folds(cases, "canine lymphosarcoma")
  expected = sorted(c.file_name for c in cases
                    if c.split == "train" and c.tumor == "canine_lymphoma")
  assert len(expected) == 43
  assert sorted(sum((v for _, v in lymphoma), [])) == expected
  for train, valid in lymphoma:
    assert sorted(train + valid) == expected
  assert folds_lib.folds(cases, "canine lymphoma") == lymphoma
  assert folds_lib.folds(cases, "canine_lymphoma") == lymphoma
  assert folds_lib.folds(cases, ["Canine Lymphoma"]) == lymphoma
  assert folds_lib.fold(cases, "canine_lymphoma", 3) == lymphoma[3]
  assert folds_lib.folds(cases, "all") != folds_lib.folds(
      cases, "human breast cancer")


@needs_real_files
def test_cli_json(cases, capsys):
  args = ["folds", "--annotations", str(REAL_JSON), "--splits", str(REAL_CSV),
          "--tumor-types", "canine lymphoma,human melanoma", "--json"]
  assert experiments.main(args) == 0
  out = json.loads(capsys.readouterr().out)
  assert isinstance(out, list) and len(out) == 5
  assert all(set(o) == {"train", "valid"} for o in out)
  want = folds_lib.folds(cases, "canine_lymphoma,human_melanoma")
  assert [(o["train"], o["valid"]) for o in out] == want
  assert experiments.main(args[:-3] + ["--tumor-types", "feline", "--json"]) == 2
  assert "unknown tumour type" in capsys.readouterr().err


@needs_real_files
def test_cli_module_entry_point():
  result = subprocess.run(
      [sys.executable, "-m", "midog_jax.experiments", "folds",
       "--annotations", str(REAL_JSON), "--splits", str(REAL_CSV),
       "--tumor-types", "all", "--json"],
      cwd=ROOT, env=env_without_accelerators(), capture_output=True,
      text=True, timeout=120, check=True)
  out = json.loads(result.stdout)
  assert [len(o["valid"]) for o in out] == [79, 79, 78, 78, 78]


def _case(i, tumor="canine_lymphoma", split="train", mitoses=0):
  objects = tuple(ann_lib.MidogObject(100 * i + j, 10.0, 10.0, 1, (1, 1))
                  for j in range(mitoses))
  return ann_lib.Case(id=i, file_name=f"{i:03d}.tiff", width=100, height=100,
                      tumor=tumor, domain="3", split=split, um_per_px=0.25,
                      objects=objects)


def test_selection_and_order_without_real_files():
  cases = [_case(i, mitoses=i) for i in range(20, 0, -1)]
  cases += [_case(30, split="test"), _case(31, tumor="human_melanoma")]
  chosen = folds_lib.fold_cases(cases, "lymphosarcoma")
  assert [c.id for c in chosen] == list(range(1, 21))
  splits = folds_lib.folds(cases, "canine lymphoma")
  assert sorted(sum((v for _, v in splits), [])) == [c.file_name for c in chosen]
  with pytest.raises(ValueError, match="at least 5"):
    folds_lib.folds(cases, "human_melanoma")
  with pytest.raises(ValueError, match="fold must be"):
    folds_lib.fold(cases, "all", 5)


def test_count_bins_ties():
  counts = [3, 0, 9, 1, 7, 4, 12, 2, 5]
  np.testing.assert_array_equal(folds_lib.count_bins(counts),
                                pd.qcut(pd.Series(counts), 3, labels=False))
  # The reference's qcut would raise here (edges 0, 0, 1/3, 5): merged into
  # two bins instead.
  tied = [0] * 10 + [1, 2, 3, 4, 5]
  with pytest.raises(ValueError):
    pd.qcut(pd.Series(tied), 3, labels=False)
  bins = folds_lib.count_bins(tied)
  assert bins.tolist() == [0] * 10 + [1] * 5
  cases = [_case(i + 1, mitoses=n) for i, n in enumerate(tied)]
  splits = folds_lib.folds(cases, "all")
  assert sorted(sum((v for _, v in splits), [])) == sorted(
      c.file_name for c in cases)


def test_num_folds_and_seed_are_used():
  from sklearn.model_selection import StratifiedKFold
  cases = [_case(i, mitoses=i) for i in range(1, 13)]
  three = folds_lib.folds(cases, "all", num_folds=3, seed=7)
  assert len(three) == 3
  bins = folds_lib.count_bins(list(range(1, 13)))
  names = [c.file_name for c in sorted(cases, key=lambda c: c.id)]
  expected = [[names[i] for i in v] for _, v in
              StratifiedKFold(3, shuffle=True, random_state=7).split(np.zeros(12), bins)]
  assert [v for _, v in three] == expected
  assert folds_lib.folds(cases, "all", 3, 8) != three
  assert folds_lib.fold(cases, "all", 2, num_folds=3, seed=7) == three[2]
  with pytest.raises(ValueError, match=r"fold must be in 0..2"):
    folds_lib.fold(cases, "all", 3, num_folds=3)
  with pytest.raises(ValueError, match="at least 13.*lower num_folds"):
    folds_lib.folds(cases, "all", num_folds=13)
  # Every tertile smaller than the fold count: a message, not scikit-learn's.
  with pytest.raises(ValueError, match="cannot be stratified into 5 folds.*lower num_folds"):
    folds_lib.folds([_case(i, mitoses=i) for i in range(1, 7)], "all")
