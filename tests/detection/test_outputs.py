"""The output-format table: registered toy formats (conftest.py) get their options;
their files are checked on detect's own run in test_detector.py."""

import pytest

from midog_jax import detect
from midog_jax.detection import outputs


def test_registered_formats_are_options_of_detect(toy_formats, capsys):
  with pytest.raises(SystemExit):
    detect.build_parser().parse_args(["--help"])
  text = capsys.readouterr().out
  assert "--toy-counts FILE" in text and "--toy-points DIR" in text and "--geojson DIR" in text


def test_prepare_refuses_a_folder_for_a_file_and_makes_folders(tmp_path):
  (tmp_path / "taken").mkdir()
  with pytest.raises(ValueError, match="--out .*taken is a folder"):
    outputs.prepare({"midog_json": str(tmp_path / "taken")})
  outputs.prepare({"midog_json": str(tmp_path / "a" / "p.json"), "geojson": str(tmp_path / "g")})
  assert (tmp_path / "a").is_dir() and (tmp_path / "g").is_dir()
