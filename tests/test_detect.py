"""The detector command line on trained runs of the synthetic dataset."""

import json
import pathlib

import numpy as np
import pytest
import tifffile

from midog_jax import dataset, detect, eval as eval_lib, predictions, roi_io


@pytest.fixture(scope="module")
def run_dir(plan_runs):
  return plan_runs / "all_domains" / "fold0"


def test_load_run_takes_the_best_checkpoint(run_dir):
  run = detect.load_run(str(run_dir))
  best = max(int(p.name) for p in (run_dir / "checkpoints" / "best").iterdir() if p.name.isdigit())
  assert run.step == best
  assert run.config.patch_size == 64
  ckpt = run_dir / "checkpoints" / "latest" / str(
      max(int(p.name) for p in (run_dir / "checkpoints" / "latest").iterdir() if p.name.isdigit()))
  assert detect.load_run(checkpoint=str(ckpt)).step == int(ckpt.name)
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    detect.load_run(str(run_dir / "nope"))


def test_split_to_midog_json_geojson_and_overlays(run_dir, synthetic_data_dir, tmp_path, capsys):
  out = tmp_path / "pred.json"
  code = detect.main(["--workdir", str(run_dir), "--split", "test", "--data-dir",
                      synthetic_data_dir, "--out", str(out), "--geojson", str(tmp_path / "gj"),
                      "--overlay", str(tmp_path / "ov"), "--threshold", "0.01"])
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
    assert len(gj["features"]) == len(raw[c.file_name]["points"])
    assert all(f["geometry"]["type"] == "Point" for f in gj["features"])
    png = (tmp_path / "ov" / c.file_name.replace(".tiff", ".png")).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
  # Pixel positions survive the mm round trip.
  back = predictions.read_predictions(str(out), {c.file_name: c.um_per_px for c in cases})
  name = next(n for n in raw if raw[n]["points"])
  gj = json.loads((tmp_path / "gj" / name.replace(".tiff", ".geojson")).read_text())
  np.testing.assert_allclose(back[name].xy[0], gj["features"][0]["geometry"]["coordinates"],
                             atol=1e-6)


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


def test_bad_images_are_clean_errors(run_dir, tmp_path, capsys):
  tifffile.imwrite(tmp_path / "deep.tiff", np.zeros((64, 64, 3), np.uint16))
  (tmp_path / "junk.tiff").write_text("not an image")
  for name, message in (("missing.tiff", "image file not found"),
                        ("junk.tiff", "not a readable TIFF"),
                        ("deep.tiff", "uint16 pixels are not supported")):
    code = detect.main(["--workdir", str(run_dir), "--images", str(tmp_path / name),
                        "--out", str(tmp_path / "p.json"), "--um-per-px", "0.25"])
    assert code == 2
    err = capsys.readouterr().err
    assert name in err and message in err
