"""The detector command line on trained runs of the synthetic dataset."""

import json
import pathlib
import warnings

import numpy as np
import pytest
import tifffile

from midog_jax import detect
from midog_jax.data import dataset
from midog_jax.data import roi_io
from midog_jax.detection import detector
from midog_jax.detection import predictions


@pytest.fixture(scope="module")
def run_dir(plan_runs):
  return plan_runs / "all_domains" / "fold0"


def test_load_run_takes_the_best_checkpoint(run_dir, monkeypatch):
  metrics = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
  best_ap = max(r["valid_ap"] for r in metrics)
  best = min(r["step"] for r in metrics if r["valid_ap"] == best_ap)  # Earliest on ties.
  run = detector.load_run(str(run_dir))
  assert run.step == best
  assert run.config.patch_size == 64
  latest = max(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
  assert latest == metrics[-1]["step"]
  assert detector.load_run(checkpoint=str(run_dir / "checkpoints" / str(latest))).step == latest
  # Relative paths work (Orbax itself wants absolute ones).
  monkeypatch.chdir(run_dir.parent)
  assert detector.load_run(run_dir.name).step == best
  with pytest.raises(FileNotFoundError, match="not a training run"):
    detector.load_run(str(run_dir / "nope"))


def test_split_to_midog_json_geojson_overlays_and_registered_formats(
    run_dir, synthetic_data_dir, tmp_path, capsys, toy_formats):
  out = tmp_path / "pred.json"
  code = detect.main(["--workdir", str(run_dir), "--split", "test", "--data-dir",
                      synthetic_data_dir, "--out", str(out), "--geojson", str(tmp_path / "gj"),
                      "--overlay", str(tmp_path / "ov"), "--min-score", "0.01",
                      "--threshold", "0.015", "--toy-counts", str(tmp_path / "counts.json"),
                      "--toy-points", str(tmp_path / "points")])
  assert code == 0
  cases = dataset.read_cases(synthetic_data_dir, "test")
  raw = json.loads(out.read_text())
  assert set(raw) == {c.file_name for c in cases}
  for c in cases:
    for p in raw[c.file_name]["points"]:
      assert p["name"] == "mitotic figure" and p["probability"] > 0.01
      x_mm, y_mm, z = p["point"]
      assert z == 0 and 0 <= x_mm <= c.width * c.um_per_px / 1000
    gj = json.loads((tmp_path / "gj" / c.file_name.replace(".tiff", ".geojson")).read_text())
    assert gj["type"] == "FeatureCollection"
    # GeoJSON: the operating point only; the MIDOG JSON: every probability.
    assert len(gj["features"]) == sum(p["probability"] > 0.015 for p in raw[c.file_name]["points"])
    assert all(f["geometry"]["type"] == "Point" for f in gj["features"])
    png = (tmp_path / "ov" / c.file_name.replace(".tiff", ".png")).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
  # Pixel positions survive the mm round trip.
  back = predictions.read_predictions(str(out), {c.file_name: c.um_per_px for c in cases})
  name = next(n for n in raw if any(p["probability"] > 0.015 for p in raw[n]["points"]))
  gj = json.loads((tmp_path / "gj" / name.replace(".tiff", ".geojson")).read_text())
  above = back[name].scores > 0.015
  np.testing.assert_allclose(back[name].xy[above],
                             [f["geometry"]["coordinates"] for f in gj["features"]], atol=1e-6)
  assert "operating point 0.015 (--threshold)" in capsys.readouterr().out
  # The toy formats of the output-format table (tests/detection/test_outputs.py).
  counts = json.loads((tmp_path / "counts.json").read_text())
  assert set(counts) == set(raw)
  for name, points in raw.items():
    assert counts[name][0] == sum(p["probability"] > 0.5 for p in points["points"])
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # An image without points is an empty file.
      xy = np.loadtxt(tmp_path / "points" / name.replace(".tiff", ".txt"), ndmin=2)
    assert len(xy) == sum(p["probability"] > 0.015 for p in points["points"])


def test_operating_point_is_the_one_chosen_on_validation(tmp_path):
  import types
  run = types.SimpleNamespace(workdir=str(tmp_path), step=40)
  assert detector.operating_point(run, None)[0] == 0.5  # Not evaluated yet: the reference's.
  (tmp_path / "evaluation.json").write_text(json.dumps({"checkpoint_step": 40, "threshold": 0.73}))
  value, source = detector.operating_point(run, None)
  assert value == 0.73 and "validation fold" in source
  assert detector.operating_point(run, 0.6) == (0.6, "--threshold")
  run.step = 44  # Evaluated on another checkpoint: not this one's.
  assert detector.operating_point(run, None)[0] == 0.5
  # `eval --runs --checkpoint last` chose one for the last step: the overlay uses that one.
  (tmp_path / "evaluation.last.json").write_text(json.dumps({"checkpoint_step": 44,
                                                             "threshold": 0.53}))
  value, source = detector.operating_point(run, None)
  assert value == 0.53 and source.endswith("evaluation.last.json")


def test_own_tiffs_rgba_and_greyscale(run_dir, tmp_path):
  rng = np.random.default_rng(0)
  rgb = rng.integers(100, 250, (150, 200, 3), dtype=np.uint8)
  roi_io.write_roi(tmp_path / "rgba.tiff", rgb, 0.25)  # RGBA with resolution tags.
  tifffile.imwrite(tmp_path / "grey.tiff", rgb[..., 0])  # No resolution tags.
  tifffile.imwrite(tmp_path / "small.tiff", rgb[:40, :30])  # Smaller than a window.
  paths = [str(tmp_path / n) for n in ("rgba.tiff", "grey.tiff", "small.tiff")]
  out = tmp_path / "p.json"
  assert detect.main(["--workdir", str(run_dir), "--images", *paths, "--out", str(out)]) == 2
  assert detect.main(["--workdir", str(run_dir), "--images", *paths, "--out", str(out),
                      "--um-per-px", "0.25"]) == 0
  assert set(json.loads(out.read_text())) == {"rgba.tiff", "grey.tiff", "small.tiff"}


def test_bad_images_are_reported_and_the_others_still_written(run_dir, tmp_path, capsys):
  tifffile.imwrite(tmp_path / "deep.tiff", np.zeros((64, 64, 3), np.uint16))
  (tmp_path / "junk.tiff").write_text("not an image")
  roi_io.write_roi(tmp_path / "good.tiff", np.full((100, 120, 3), 200, np.uint8), 0.25)
  bad = (("missing.tiff", "image file not found"), ("junk.tiff", "not a readable TIFF"),
         ("deep.tiff", "uint16 pixels are not supported"))
  out = tmp_path / "new" / "folder" / "p.json"  # Created before any work.
  code = detect.main(["--workdir", str(run_dir), "--images", str(tmp_path / "good.tiff"),
                      *(str(tmp_path / n) for n, _ in bad), "--out", str(out),
                      "--um-per-px", "0.25", "--geojson", str(tmp_path / "gj")])
  assert code == 1
  err = capsys.readouterr().err
  for name, message in bad:
    assert f"{name}: {message}" in err or (name in err and message in err)
  assert "3 image(s) failed; the other 1 were written" in err
  assert set(json.loads(out.read_text())) == {"good.tiff"}
  assert (tmp_path / "gj" / "good.geojson").exists()


def test_inputs_with_one_file_name_are_refused_before_work(run_dir, tmp_path, capsys):
  for sub in ("a", "b"):
    (tmp_path / sub).mkdir()
    roi_io.write_roi(tmp_path / sub / "x.tiff", np.full((64, 64, 3), 200, np.uint8), 0.25)
  code = detect.main(["--workdir", str(run_dir), "--images", str(tmp_path / "a" / "x.tiff"),
                      str(tmp_path / "b" / "x.tiff"), "--out", str(tmp_path / "p.json")])
  assert code == 2
  assert "the same file name x.tiff" in capsys.readouterr().err
  assert not (tmp_path / "p.json").exists()


def test_split_valid_is_the_runs_own_fold(run_dir, synthetic_data_dir, tmp_path, capsys):
  out = tmp_path / "valid.json"
  assert detect.main(["--workdir", str(run_dir), "--split", "valid", "--data-dir",
                      synthetic_data_dir, "--out", str(out), "--min-score", "0.3"]) == 0
  valid = json.loads((run_dir / "cases.json").read_text())["valid"]
  assert sorted(json.loads(out.read_text())) == sorted(valid)
  assert all(p["probability"] > 0.3 for v in json.loads(out.read_text()).values()
             for p in v["points"])
  assert "(score > 0.3)" in capsys.readouterr().out


def test_workdir_and_checkpoint_together_name_one_step(run_dir, synthetic_data_dir, tmp_path,
                                                        capsys, monkeypatch):
  latest = max(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
  common = ["--split", "valid", "--data-dir", synthetic_data_dir, "--min-score", "0.3",
            "--out", str(tmp_path / "p.json")]
  assert detect.main(["--workdir", str(run_dir), "--checkpoint", str(latest), *common]) == 0
  assert "keeps every detection above 0.3" in capsys.readouterr().out
  called = []
  monkeypatch.setattr(detect, "_detect", lambda args: called.append(args.checkpoint) or 0)
  for checkpoint in (str(latest), str(run_dir / "checkpoints" / str(latest))):
    assert detect.main(["--workdir", str(run_dir), "--checkpoint", checkpoint, *common]) == 0
  assert called == [str(run_dir / "checkpoints" / str(latest))] * 2
  with pytest.raises(SystemExit):
    detect.main(["--workdir", str(run_dir), "--checkpoint", str(tmp_path / "checkpoints" / "3"),
                 *common])
  assert "is not a checkpoint of --workdir" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    detect.main(common)
  assert "one of --workdir, --checkpoint and --model is required" in capsys.readouterr().err
