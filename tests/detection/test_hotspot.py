"""Counts per mm² and the exact hotspot, against brute force on small integer grids."""

import math

import numpy as np
import pytest

from midog_jax.detection import hotspot


def _allowed_centres(region, cell, size):
  """bool [size, size]: integer centres inside a closed tissue cell (painted cell by cell)."""
  ok = np.zeros((size, size), bool)
  if region is None:
    ok[:] = True
    return ok
  for i, j in zip(*np.nonzero(region)):
    ok[i * cell:min((i + 1) * cell, size - 1) + 1,
       j * cell:min((j + 1) * cell, size - 1) + 1] = True
  return ok


def _brute_force(points, w, h, region, cell, lo=-20, hi=60):
  """Max points in a closed w x h rectangle over every integer top-left corner in [lo, hi)."""
  pts = np.asarray(points).reshape(-1, 2)
  x0 = np.arange(lo, hi)[:, None, None]
  y0 = np.arange(lo, hi)[None, :, None]
  inside = ((pts[:, 0] >= x0) & (pts[:, 0] <= x0 + w) & (pts[:, 1] >= y0)
            & (pts[:, 1] <= y0 + h)).sum(-1)  # [x0, y0]
  size = 2 * hi
  allowed = _allowed_centres(region, cell, size)
  cx = np.clip(np.arange(lo, hi) + w // 2, 0, size - 1)
  cy = np.clip(np.arange(lo, hi) + h // 2, 0, size - 1)
  ok = allowed[cy][:, cx].T  # [x0, y0]
  if region is not None:  # Centres off the painted grid are off tissue.
    ok &= ((np.arange(lo, hi) + w // 2 >= 0)[:, None] & (np.arange(lo, hi) + h // 2 >= 0)[None])
  return int(np.where(ok, inside, 0).max())


def test_best_rectangle_equals_brute_force_on_integer_grids():
  rng = np.random.default_rng(0)
  for trial in range(60):
    n = int(rng.integers(0, 30))
    pts = rng.integers(0, 40, (n, 2)).astype(np.float64)
    if trial % 4 == 0 and n > 3:  # Many points on shared lines: the closed edges matter.
      pts[: n // 2, 0] = pts[0, 0]
      pts[n // 4:, 1] = pts[-1, 1]
    w, h = 2 * int(rng.integers(1, 9)), 2 * int(rng.integers(1, 7))  # Even: centres integer.
    cell = int(rng.integers(1, 6))
    region = None if trial % 3 == 0 else rng.random((40 // cell + 1, 40 // cell + 1)) < 0.3
    spot = hotspot.best_rectangle(pts, w, h, region, cell)
    expected = _brute_force(pts, w, h, region, cell)
    assert spot.count == expected, (trial, spot, expected)
    if expected:
      # The rectangle returned holds its count and has its centre on tissue.
      assert hotspot.count_in_rectangle(pts, spot.x, spot.y, w, h) == spot.count
      if region is not None:
        cx, cy = spot.centre
        assert any(j * cell <= cx <= (j + 1) * cell and i * cell <= cy <= (i + 1) * cell
                   for i, j in zip(*np.nonzero(region)))
    else:
      assert spot.x is None


def test_centre_on_tissue_rule_and_closed_edges():
  # Five figures on glass-side cells, three on a tissue cell far away.
  crowd = np.array([[2, 2], [3, 3], [4, 2], [2, 4], [4, 4]], np.float64)
  few = np.array([[52, 52], [55, 55], [58, 53]], np.float64)
  pts = np.concatenate([crowd, few])
  region = np.zeros((8, 8), bool)
  region[5, 5] = True  # Cell [50, 60] x [50, 60] only.
  free = hotspot.best_rectangle(pts, 10, 10)
  assert free.count == 5
  on_tissue = hotspot.best_rectangle(pts, 10, 10, region, 10)
  assert on_tissue.count == 3  # A centre at (50, 50) or beyond cannot reach the crowd.
  cx, cy = on_tissue.centre
  assert 50 <= cx <= 60 and 50 <= cy <= 60
  region[5, 5], region[6, 6] = False, True  # Centre in [60, 70]: one of the three in reach.
  assert hotspot.best_rectangle(pts, 10, 10, region, 10).count == 1
  # Points exactly w apart both count (closed rectangle); w - 1 would not hold them.
  edge = np.array([[0, 0], [10, 0], [10, 5]], np.float64)
  assert hotspot.best_rectangle(edge, 10, 5).count == 3
  assert hotspot.best_rectangle(edge, 9, 5).count == 2
  assert hotspot.best_rectangle(np.zeros((0, 2)), 10, 5).count == 0


def test_large_coordinates_do_not_lose_points_to_rounding():
  # x - w + w is not always x in floating point: the edge tolerance keeps them.
  rng = np.random.default_rng(1)
  w, h = hotspot.rectangle_px(2.37, 4 / 3, 0.2527)
  pts = rng.random((300, 2)) * [90_000.0, 70_000.0]
  spot = hotspot.best_rectangle(pts, w, h)
  assert spot.count == hotspot.count_in_rectangle(pts, spot.x, spot.y, w, h)
  # No shift of the rectangle by a multiple of a tenth of its size does better.
  best_grid = max(hotspot.count_in_rectangle(pts, x, y, w, h)
                  for x in np.arange(-w, 90_000, w / 10) for y in np.arange(-h, 70_000, h / 10))
  assert spot.count >= best_grid


def test_rectangle_size_counts_per_mm2_and_density():
  w, h = hotspot.rectangle_px(2.37, 4 / 3, 0.25)
  assert math.isclose(w * h * 0.25 ** 2, 2.37e6) and math.isclose(w / h, 4 / 3)
  with pytest.raises(ValueError, match="positive"):
    hotspot.rectangle_px(0, 1, 0.25)
  # A 100 x 70 px slide, 8 px cells (13 x 9, the last row and column cut by the edge).
  rng = np.random.default_rng(2)
  region = rng.random((9, 13)) < 0.5
  canvas = np.zeros((70, 100), bool)  # Brute force: paint each pixel of the slide.
  for i, j in zip(*np.nonzero(region)):
    canvas[i * 8:(i + 1) * 8, j * 8:(j + 1) * 8] = True
  area = hotspot.region_mm2(region, 8, 0.5, 100, 70)
  assert math.isclose(area, canvas.sum() * 0.5 ** 2 / 1e6)
  pts = rng.random((200, 2)) * [100, 70]
  inside = hotspot.in_region(pts, region, 8)
  assert inside.tolist() == [bool(canvas[int(y), int(x)]) for x, y in pts]
  assert math.isclose(hotspot.per_mm2(int(inside.sum()), area), inside.sum() / area)
  assert hotspot.per_mm2(3, 0.0) is None
  # The density integrates to the number of figures (far from the borders).
  centre = np.array([[400.0, 400.0]] * 7)
  dens = hotspot.density(centre, (100, 100), 8, 0.25, sigma_mm=0.02)
  assert math.isclose(dens.sum() * (8 * 0.25 / 1000) ** 2, 7, rel_tol=1e-6)
