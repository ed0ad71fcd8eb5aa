"""`python -m midog_jax.eval score` on a small real-format data set."""

import json
import os

import numpy as np
import pytest

from midog_jax import eval as eval_lib
from midog_jax.data import synthetic
from midog_jax.detection import predictions as predictions_lib
from midog_jax.evaluation import metrics


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("ds"))
  cases = synthetic.write_dataset(out, 1, 128, 96, seed=0, density_scale=300, progress=False)
  return out, cases


def _args(out, preds, *extra):
  return ["score", "--annotations", os.path.join(out, "MIDOG++.json"),
          "--splits", os.path.join(out, "datasets_xvalidation.csv"),
          "--predictions", preds, "--split", "train", *extra]


def _free_spot(case, gt):
  """A point of the image beyond the matching radius of every figure, or None."""
  grid = np.stack(np.meshgrid(np.arange(0, case.width, 4.0), np.arange(0, case.height, 4.0)),
                  -1).reshape(-1, 2)
  if not len(gt):
    return grid[0]
  gap = np.linalg.norm(grid[:, None] - gt[None], axis=-1).min(1)
  return grid[gap.argmax()] if gap.max() > metrics.radius_px(case.um_per_px) + 1 else None


def _write(path, cases, rng):
  """Finds each mitotic figure with a score in (0.5, 1) except every third
  (score 0.4), plus one false positive per case with score 0.75 where a spot
  of the image lies beyond the matching radius of every figure."""
  dets, expected = {}, {}
  for c in cases:
    gt = np.asarray([(o.x, o.y) for o in c.mitotic_figures]).reshape(-1, 2)
    scores = np.where(np.arange(len(gt)) % 3 == 2, 0.4, rng.uniform(0.8, 1.0, len(gt)))
    xy = gt + rng.normal(0, 3, gt.shape)
    spot = _free_spot(c, gt)
    fp = int(spot is not None)
    if fp:
      xy, scores = np.concatenate([xy, [spot]]), np.append(scores, 0.75)
    dets[c.file_name] = (xy, scores)
    found = int((scores[:len(gt)] > 0.5).sum())
    expected[c.file_name] = {"tp": found, "fp": fp, "fn": len(gt) - found}
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
    # 0 / 0 is undefined: null in JSON ("n/a" in the table), never 0 or 1.
    assert m["precision"] == (pytest.approx(c.tp / (c.tp + c.fp)) if c.tp + c.fp else None)
    assert m["recall"] == (pytest.approx(c.tp / (c.tp + c.fn)) if c.tp + c.fn else None)
    assert m["f1"] == (pytest.approx(2 * c.tp / (2 * c.tp + c.fp + c.fn))
                       if 2 * c.tp + c.fp + c.fn else None)
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
  val, fps = {}, 0
  for c in cases[:6]:
    gt = np.asarray([(o.x, o.y) for o in c.mitotic_figures]).reshape(-1, 2)
    spot = _free_spot(c, gt)
    fps += spot is not None
    extra = [] if spot is None else [spot]
    val[c.file_name] = (np.concatenate([gt, np.reshape(extra, (-1, 2))]),
                        np.append(np.full(len(gt), 0.9), [0.77] * len(extra)))
  assert fps
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


@pytest.mark.parametrize("point,message", [
    ({"name": "mitotic figure", "point": [-0.1, 0.01, 0], "probability": 0.9}, "negative coordinates"),
    ({"name": "mitotic figure", "point": [0.01, 0.01, 0], "probability": -1}, "outside [0, 1]"),
    ({"name": "mitotic figure", "point": [0.01, 0.01, 0], "probability": 1.5}, "outside [0, 1]"),
    ({"name": "mitotic figure", "point": [64, 48, 0], "probability": 0.9}, "not pixels"),
    ({"name": "mitotic figure", "point": [0.01, "x", 0]}, "is not a finite number"),
])
def test_bad_points_are_one_line_naming_the_record(dataset, tmp_path, capsys, point, message):
  out, cases = dataset
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({cases[0].file_name: {"points": [point]}}))
  assert eval_lib.main(_args(out, str(bad))) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and str(bad) in err and cases[0].file_name in err
  assert message in err


def test_names_thresholds_and_folders(dataset, tmp_path, capsys, caplog):
  out, cases = dataset
  c = cases[0]
  x, y = (v * c.um_per_px / 1000 for v in (c.width / 2, c.height / 2))
  preds = tmp_path / "p.json"
  preds.write_text(json.dumps({c.file_name: {"points": [
      {"name": "Mitotic Figure", "point": [x, y, 0], "probability": 0.9},
      {"name": "non-mitotic figure", "point": [x, y, 0], "probability": 0.9}]}}))
  dets = predictions_lib.read_predictions(preds, {c.file_name: c.um_per_px})
  assert len(dets[c.file_name].scores) == 1  # Any capitalisation counts.
  assert "left out 1 point(s) not named 'mitotic figure'" in caplog.text
  for value in ("nan", "1.5", "-0.1"):
    with pytest.raises(SystemExit):
      eval_lib.main(_args(out, str(preds), "--threshold", value))
    assert "--threshold" in capsys.readouterr().err
  assert eval_lib.main(_args(out, str(tmp_path))) == 2
  assert "is a folder" in capsys.readouterr().err


def test_missing_case_counts_as_empty(dataset, tmp_path, capsys):
  out, cases = dataset
  predictions_lib.write_predictions(tmp_path / "p.json", {}, {})
  assert eval_lib.main(_args(out, str(tmp_path / "p.json"), "--json")) == 0
  captured = capsys.readouterr()
  report = json.loads(captured.out)
  for c in cases:
    assert report["cases"][c.file_name] == {"tp": 0, "fp": 0, "fn": len(c.mitotic_figures)}
  # One warning line that says how many it names of how many.
  n = len(report["cases"])
  assert n > 5
  warning = [l for l in captured.err.splitlines() if "No predictions" in l]
  assert warning == [f"warning: No predictions for {n} case(s), scored as empty: "
                     + ", ".join(list(report["cases"])[:5])
                     + f" (first 5 of {n})"]


def test_first_of_says_when_it_truncates():
  from midog_jax import console
  assert console.first_of(["a", "b"]) == "a, b"
  assert console.first_of(list("abcdef"), 5) == "a, b, c, d, e (first 5 of 6)"
  assert console.first_of(list("abcde"), 5) == "a, b, c, d, e"


def test_points_without_probability_are_warned_and_names_differing_in_case_refused(
    dataset, tmp_path, capsys, caplog):
  out, cases = dataset
  c = cases[0]
  x, y = (v * c.um_per_px / 1000 for v in (c.width / 2, c.height / 2))
  preds = tmp_path / "p.json"
  preds.write_text(json.dumps({c.file_name: {"points": [
      {"name": "mitotic figure", "point": [x, y, 0]},
      {"name": "mitotic figure", "point": [x, y, 0]},
      {"name": "mitotic figure", "point": [x, y, 0], "probability": 0.9}]}}))
  dets = predictions_lib.read_predictions(preds, {c.file_name: c.um_per_px})
  np.testing.assert_array_equal(dets[c.file_name].scores, [0.5, 0.5, 0.9])  # The reference's.
  warned = [r.getMessage() for r in caplog.records if "without a 'probability'" in r.getMessage()]
  assert len(warned) == 1 and "2 point(s)" in warned[0] and "--threshold" in warned[0]

  upper = c.file_name.replace(".tiff", ".TIFF")
  preds.write_text(json.dumps({upper: {"points": []}}))
  assert eval_lib.main(_args(out, str(preds))) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f"{upper!r} is not in the annotations, but {c.file_name!r} is" in err[0]


def test_predictions_for_other_annotations_are_refused_not_scored_as_zeros(tmp_path, capsys):
  # Predictions of the test cases scored as the train split: the same file names exist
  # (as the demo's against the real MIDOG++.json) but none of them is scored.
  out = str(tmp_path / "ds")
  cases = synthetic.write_dataset(out, 2, 64, 64, seed=0, density_scale=300, progress=False)
  test = [c for c in cases if c.split == "test"]
  train = [c for c in cases if c.split == "train"]
  assert test and train
  _write(tmp_path / "p.json", test, np.random.default_rng(1))
  assert eval_lib.main(_args(out, str(tmp_path / "p.json"))) == 2
  [line] = capsys.readouterr().err.strip().splitlines()
  assert line.startswith(f"error: {tmp_path / 'p.json'}: holds {len(test)} image(s) that ")
  assert f"lacks {len(train)} of its {len(train)} train case(s)" in line
  # Both splits in one file, or one split's cases alone: scored.
  _write(tmp_path / "all.json", cases, np.random.default_rng(1))
  assert eval_lib.main(_args(out, str(tmp_path / "all.json"))) == 0
