"""`python -m midog_jax.eval score` on a small real-format data set."""

import json
import os

import numpy as np
import pytest

from midog_jax import eval as eval_lib
from midog_jax import metrics
from midog_jax import predictions as predictions_lib
from midog_jax import synthetic


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("ds"))
  cases = synthetic.write_dataset(out, 1, 128, 96, seed=0, density_scale=300, progress=False)
  return out, cases


def _args(out, preds, *extra):
  return ["score", "--annotations", os.path.join(out, "MIDOG++.json"),
          "--splits", os.path.join(out, "datasets_xvalidation.csv"),
          "--predictions", preds, "--split", "train", *extra]


def _write(path, cases, rng):
  """Finds each mitotic figure with a score in (0.5, 1) except every third
  (score 0.4), plus one false positive per case with score 0.75."""
  dets, expected = {}, {}
  for c in cases:
    gt = np.asarray([(o.x, o.y) for o in c.mitotic_figures]).reshape(-1, 2)
    scores = np.where(np.arange(len(gt)) % 3 == 2, 0.4, rng.uniform(0.8, 1.0, len(gt)))
    far = (-500.0, -500.0)  # Outside the 128 x 96 px images, beyond any radius.
    xy = np.concatenate([gt + rng.normal(0, 3, gt.shape), [far]])
    dets[c.file_name] = (xy, np.append(scores, 0.75))
    found = int((scores > 0.5).sum())
    expected[c.file_name] = {"tp": found, "fp": 1, "fn": len(gt) - found}
  predictions_lib.write_predictions(path, dets, {c.file_name: c.um_per_px for c in cases})
  return expected


def test_score_json_recomputes_from_case_counts(dataset, tmp_path, capsys):
  out, cases = dataset
  rng = np.random.default_rng(0)
  expected = _write(tmp_path / "p.json", cases, rng)
  assert eval_lib.main(_args(out, str(tmp_path / "p.json"), "--threshold", "0.6", "--json")) == 0
  report = json.loads(capsys.readouterr().out)
  assert report["threshold"] == 0.6
  assert report["cases"] == expected
  tumor_of = {c.file_name: c.tumor for c in cases}
  assert set(report["tumor_types"]) == set(tumor_of.values())
  groups = list(report["tumor_types"].items()) + [("overall", report["overall"])]
  for name, m in groups:
    c = metrics.pool(metrics.Counts(**v) for f, v in report["cases"].items()
                     if name == "overall" or tumor_of[f] == name)
    assert (m["tp"], m["fp"], m["fn"]) == c
    assert m["precision"] == pytest.approx(c.tp / (c.tp + c.fp))
    assert m["recall"] == (pytest.approx(c.tp / (c.tp + c.fn)) if c.tp + c.fn else 0.0)
    assert m["f1"] == pytest.approx(2 * c.tp / (2 * c.tp + c.fp + c.fn))
    n_gt = c.tp + c.fn
    # AP: no ground truth -> null; otherwise the unthresholded ranking puts
    # the 0.75 false positives above the 0.4 true positives.
    if n_gt == 0:
      assert m["ap"] is None
    else:
      assert 0.0 < m["ap"] <= 1.0
  assert report["overall"]["ap"] < 1.0


def test_choose_threshold_on_validation_file(dataset, tmp_path, capsys):
  out, cases = dataset
  rng = np.random.default_rng(1)
  _write(tmp_path / "p.json", cases, rng)
  # Validation: every figure found at 0.9, one false positive at 0.77 each,
  # so the best pooled F1 (1.0) starts at 0.77.
  val = {}
  for c in cases[:6]:
    gt = np.asarray([(o.x, o.y) for o in c.mitotic_figures]).reshape(-1, 2)
    val[c.file_name] = (np.concatenate([gt, [[-500.0, -500.0]]]), np.append(np.full(len(gt), 0.9), 0.77))
  predictions_lib.write_predictions(tmp_path / "v.json", val,
                                    {c.file_name: c.um_per_px for c in cases})
  assert eval_lib.main(_args(out, str(tmp_path / "p.json"),
                             "--choose-threshold-on", str(tmp_path / "v.json"), "--json")) == 0
  report = json.loads(capsys.readouterr().out)
  assert report["threshold"] == pytest.approx(0.77)
  # At 0.77 the test file's 0.75 false positives are gone.
  assert report["overall"]["fp"] == 0


def test_table_and_errors(dataset, tmp_path, capsys):
  out, cases = dataset
  _write(tmp_path / "p.json", cases, np.random.default_rng(2))
  assert eval_lib.main(_args(out, str(tmp_path / "p.json"))) == 0
  table = capsys.readouterr().out
  assert "threshold 0.50" in table and "overall" in table
  assert cases[3].tumor in table
  bad = tmp_path / "bad.json"
  bad.write_text('{"001.tiff": {"points": [{"point": "x"}]}}')
  assert eval_lib.main(_args(out, str(bad))) == 2
  err = capsys.readouterr().err
  assert str(bad) in err and "001.tiff" in err
  with pytest.raises(SystemExit):
    eval_lib.main(_args(out, str(bad), "--threshold", "0.5", "--choose-threshold-on", str(bad)))


def test_missing_case_counts_as_empty(dataset, tmp_path, capsys):
  out, cases = dataset
  predictions_lib.write_predictions(tmp_path / "p.json", {}, {})
  assert eval_lib.main(_args(out, str(tmp_path / "p.json"), "--json")) == 0
  report = json.loads(capsys.readouterr().out)
  for c in cases:
    assert report["cases"][c.file_name] == {"tp": 0, "fp": 0, "fn": len(c.mitotic_figures)}
