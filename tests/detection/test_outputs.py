"""The output-format table: a registered toy format gets its option and its files."""

import json

import numpy as np
import pytest

from midog_jax import detect
from midog_jax.detection import outputs


def _toy_counts(path, found, um_per_px):
  """One file for all images: the count above 0.5 and the µm/px of each."""
  with open(path, "w", encoding="utf-8") as f:
    json.dump({n: [int((s > 0.5).sum()), um_per_px[n]] for n, (_, s) in found.items()}, f)


def _toy_points(folder, d):
  """One file per image: the points above the operating point, as text."""
  above = d.xy[d.scores > d.operating_point]
  np.savetxt(f"{folder}/{d.stem}.txt", above)


@pytest.fixture
def toy_formats(monkeypatch):
  monkeypatch.setitem(outputs.OUTPUT_FORMATS, "toy_counts", outputs.OutputFormat(
      "--toy-counts", "FILE", "counts per image", write_all=_toy_counts))
  monkeypatch.setitem(outputs.OUTPUT_FORMATS, "toy_points", outputs.OutputFormat(
      "--toy-points", "DIR", "points per image", write_image=_toy_points))


def test_registered_formats_are_options_of_detect(toy_formats, capsys):
  with pytest.raises(SystemExit):
    detect.build_parser().parse_args(["--help"])
  text = capsys.readouterr().out
  assert "--toy-counts FILE" in text and "--toy-points DIR" in text and "--geojson DIR" in text


def test_registered_formats_are_written_by_detect(toy_formats, plan_runs, synthetic_data_dir,
                                                  tmp_path):
  run = plan_runs / "all_domains" / "fold0"
  code = detect.main(["--workdir", str(run), "--split", "test", "--data-dir", synthetic_data_dir,
                      "--out", str(tmp_path / "pred.json"), "--min-score", "0.01",
                      "--threshold", "0.02", "--toy-counts", str(tmp_path / "counts.json"),
                      "--toy-points", str(tmp_path / "points")])
  assert code == 0
  midog = json.loads((tmp_path / "pred.json").read_text())
  counts = json.loads((tmp_path / "counts.json").read_text())
  assert set(counts) == set(midog)
  for name, points in midog.items():
    assert counts[name][0] == sum(p["probability"] > 0.5 for p in points["points"])
    xy = np.loadtxt(tmp_path / "points" / name.replace(".tiff", ".txt"), ndmin=2)
    assert len(xy) == sum(p["probability"] > 0.02 for p in points["points"])


def test_prepare_refuses_a_folder_for_a_file_and_makes_folders(tmp_path):
  (tmp_path / "taken").mkdir()
  with pytest.raises(ValueError, match="--out .*taken is a folder"):
    outputs.prepare({"midog_json": str(tmp_path / "taken")})
  outputs.prepare({"midog_json": str(tmp_path / "a" / "p.json"), "geojson": str(tmp_path / "g")})
  assert (tmp_path / "a").is_dir() and (tmp_path / "g").is_dir()
