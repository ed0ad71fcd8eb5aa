"""Files written whole or not at all."""

import os

import numpy as np
import pytest

from midog_jax import atomic


def test_write_bytes_takes_an_array_without_copy_and_replaces(tmp_path):
  image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
  path = tmp_path / "a.rgb"
  path.write_bytes(b"old")
  atomic.write_bytes(path, memoryview(image).cast("B"))
  np.testing.assert_array_equal(np.fromfile(path, np.uint8).reshape(2, 3, 3), image)
  assert os.listdir(tmp_path) == ["a.rgb"]


def test_json_round_trip(tmp_path):
  atomic.write_json(tmp_path / "x.json", {"a": [1, 2.5, None]})
  assert atomic.read_json(tmp_path / "x.json") == {"a": [1, 2.5, None]}
  assert (tmp_path / "x.json").read_text().endswith("\n")


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
  path = tmp_path / "summary.json"
  atomic.write_text(path, "old\n")

  def full_disk(fd):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(os, "fsync", full_disk)
  with pytest.raises(OSError, match="No space left"):
    atomic.write_text(path, "new\n")
  assert path.read_text() == "old\n"
  assert os.listdir(tmp_path) == ["summary.json"]


def test_a_figure_is_written_whole_in_the_format_of_its_suffix(tmp_path, monkeypatch):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig = plt.figure(figsize=(1, 1))
  atomic.write_figure(tmp_path / "a.png", fig, dpi=20)
  atomic.write_figure(tmp_path / "a.pdf", fig)
  assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert (tmp_path / "a.pdf").read_bytes()[:5] == b"%PDF-"
  monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "full")))
  with pytest.raises(OSError):
    atomic.write_figure(tmp_path / "a.png", fig)
  assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # The old one stays.
  assert sorted(os.listdir(tmp_path)) == ["a.pdf", "a.png"]
  plt.close(fig)
