"""Toy entries of detect's output-format table, for the seam's tests."""

import json

import numpy as np
import pytest

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
  """Two toy formats, one per image, one for all images."""
  monkeypatch.setitem(outputs.OUTPUT_FORMATS, "toy_counts", outputs.OutputFormat(
      "--toy-counts", "FILE", "counts per image", write_all=_toy_counts))
  monkeypatch.setitem(outputs.OUTPUT_FORMATS, "toy_points", outputs.OutputFormat(
      "--toy-points", "DIR", "points per image", write_image=_toy_points))
