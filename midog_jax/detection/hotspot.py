"""Mitotic counts as pathology reports define them: per mm² of tissue, and in the hotspot.

Everything is in level-0 pixels on a grid of square cells (`cell` px, the
tissue mask's): the analysed region is a set of cells, each a closed square.

* The region: tissue cells whose centre lies in the ROI (`roi_cells`).
* A figure counts when its cell is in the region; the area is the region's
  cells, clipped to the slide.
* The hotspot is the placement of an axis-aligned w x h rectangle (closed)
  with the most counted figures whose centre lies in the region ("over
  tissue"); it may reach past the tissue's edge. 2.37 mm² by default: ten
  high-power fields (0.237 mm² each, field number 22 at 40x), the area on
  which Meuten et al. standardise the mitotic count (Vet Pathol 53:7, 2016);
  Cree et al. ask for counts in a stated area in mm², hotspot or average
  (Mod Pathol 34:1651, 2021). 4:3, the shape of the MIDOG++ regions.

The hotspot is exact, found on the points themselves. The top-left corners
(x0, y0) of the placements that hold a set S of points form a closed
rectangle, those with the centre in a cell Q another one; where the two
meet, their corner of smallest x0 and y0 is a placement with x0 a point's
x - w (its right edge on the point) or a cell edge - w/2 (its centre on the
edge), and y0 likewise. Every such candidate is counted
(O((n + columns) * (n + rows) * log n)); the rectangle returned is then
moved to the middle of the placements that hold the same figures.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from matplotlib.path import Path
from scipy import ndimage

HOTSPOT_MM2 = 2.37
HOTSPOT_ASPECT = 4 / 3  # Width / height.
EPS = 1e-6  # px: a point this close to an edge is on it (rounding of x - w + w).


@dataclasses.dataclass(frozen=True)
class Hotspot:
  """The best placement: its count and rectangle (level-0 px, top-left corner)."""
  count: int
  x: float | None
  y: float | None
  w: float
  h: float

  @property
  def centre(self) -> tuple[float, float] | None:
    return None if self.x is None else (self.x + self.w / 2, self.y + self.h / 2)


def rectangle_px(area_mm2: float, aspect: float, um_per_px: float) -> tuple[float, float]:
  """(w, h) in px of a rectangle of `area_mm2` with w / h = `aspect`."""
  if not (area_mm2 > 0 and aspect > 0 and um_per_px > 0):
    raise ValueError(f"need a positive area ({area_mm2}), aspect ({aspect}) and µm/px")
  w_mm, h_mm = math.sqrt(area_mm2 * aspect), math.sqrt(area_mm2 / aspect)
  return w_mm * 1000 / um_per_px, h_mm * 1000 / um_per_px


def roi_cells(shape: tuple[int, int], cell: int, roi: tuple | None = None,
              polygons: tuple = ()) -> np.ndarray:
  """bool [rows, cols]: the cells whose centre lies in the rectangle `roi` (x, y, w, h)
  or in one of the `polygons` (rings of level-0 (x, y)); every cell without either."""
  if roi is None and not polygons:
    return np.ones(shape, bool)
  cx, cy = (np.arange(shape[1]) + 0.5) * cell, (np.arange(shape[0]) + 0.5) * cell
  out = np.zeros(shape, bool)
  if roi is not None:
    x, y, w, h = roi
    out |= ((cy >= y) & (cy < y + h))[:, None] & ((cx >= x) & (cx < x + w))[None, :]
  for ring in polygons:  # Only the cells of the ring's bounding box are tested.
    ring = np.asarray(ring, np.float64)
    j0, i0 = np.clip(np.floor(ring.min(0) / cell).astype(int), 0, shape[::-1])
    j1, i1 = np.clip(np.ceil(ring.max(0) / cell).astype(int) + 1, 0, shape[::-1])
    yy, xx = np.meshgrid(cy[i0:i1], cx[j0:j1], indexing="ij")
    inside = Path(ring).contains_points(np.stack([xx.ravel(), yy.ravel()], 1))
    out[i0:i1, j0:j1] |= inside.reshape(i1 - i0, j1 - j0)
  return out


def in_region(xy: np.ndarray, region: np.ndarray, cell: int) -> np.ndarray:
  """bool [N]: whether each point's cell (floor(x / cell), floor(y / cell)) is in the region."""
  xy = np.asarray(xy, np.float64).reshape(-1, 2)
  i = np.floor(xy[:, 1] / cell).astype(np.int64)
  j = np.floor(xy[:, 0] / cell).astype(np.int64)
  ok = (i >= 0) & (i < region.shape[0]) & (j >= 0) & (j < region.shape[1])
  out = np.zeros(len(xy), bool)
  out[ok] = region[i[ok], j[ok]]
  return out


def region_mm2(region: np.ndarray, cell: int, um_per_px: float, width: int, height: int) -> float:
  """Area of the region's cells inside the slide (cells at the edges count in part)."""
  cols = np.clip(width - np.arange(region.shape[1]) * cell, 0, cell)
  rows = np.clip(height - np.arange(region.shape[0]) * cell, 0, cell)
  px = float(rows @ region.astype(np.float64) @ cols)
  return px * (um_per_px / 1000) ** 2


def per_mm2(count: int, area_mm2: float) -> float | None:
  """count / area; None without area."""
  return count / area_mm2 if area_mm2 > 0 else None


def _cells(c: np.ndarray, cell: int, n: int) -> tuple[np.ndarray, np.ndarray]:
  """The (at most two) cells k, 0 <= k < n, whose closed span [k * cell, (k + 1) * cell]
  holds each coordinate c (-1 where none): a shared edge belongs to both."""
  lo = np.floor((c - EPS) / cell).astype(np.int64)
  hi = np.floor((c + EPS) / cell).astype(np.int64)
  valid = lambda k: np.where((k >= 0) & (k < n), k, -1)  # noqa: E731
  return valid(lo), valid(hi)


def _centre_ok(c: np.ndarray, allowed: np.ndarray, cell: int) -> np.ndarray:
  """Whether each coordinate lies in an allowed closed cell along one axis."""
  ok = np.zeros(len(c), bool)
  for k in _cells(c, cell, len(allowed)):
    ok |= (k >= 0) & allowed[np.maximum(k, 0)]
  return ok


def best_rectangle(xy: np.ndarray, w: float, h: float, region: np.ndarray | None = None,
                   cell: int = 1) -> Hotspot:
  """The w x h placement with the most points, centre in `region` (anywhere if None).

  Points on the rectangle's edges (within `EPS` px) count. Ties: the
  candidate with the smallest x0, then y0; the rectangle returned is the
  middle of the placements that hold the same points and keep the centre in
  the same cell.
  """
  xy = np.asarray(xy, np.float64).reshape(-1, 2)
  if not len(xy) or (region is not None and not region.any()):
    return Hotspot(0, None, None, w, h)
  xs_cand, ys_cand = xy[:, 0] - w, xy[:, 1] - h
  if region is not None:
    xs_cand = np.concatenate([xs_cand, np.arange(region.shape[1] + 1) * cell - w / 2])
    ys_cand = np.concatenate([ys_cand, np.arange(region.shape[0] + 1) * cell - h / 2])
  xs_cand, ys_cand = np.unique(xs_cand), np.unique(ys_cand)
  order = np.argsort(xy[:, 0], kind="stable")
  px, py = xy[order, 0], xy[order, 1]
  best = (0, None, None)
  for x0 in xs_cand:
    lo, hi = np.searchsorted(px, x0 - EPS, "left"), np.searchsorted(px, x0 + w + EPS, "right")
    if hi - lo <= best[0]:
      continue  # This column holds no more points than the best already found.
    ys = np.sort(py[lo:hi])
    counts = (np.searchsorted(ys, ys_cand + h + EPS, "right")
              - np.searchsorted(ys, ys_cand - EPS, "left"))
    if region is not None:
      ks = [int(k[0]) for k in _cells(np.array([x0 + w / 2]), cell, region.shape[1]) if k[0] >= 0]
      if not ks:
        continue
      rows = region[:, ks].any(axis=1)
      counts = np.where(_centre_ok(ys_cand + h / 2, rows, cell), counts, -1)
    i = int(np.argmax(counts))
    if counts[i] > best[0]:
      best = (int(counts[i]), float(x0), float(ys_cand[i]))
  count, x0, y0 = best
  if x0 is None:
    return Hotspot(0, None, None, w, h)
  return _centred(xy, count, x0, y0, w, h, region, cell)


def _centred(xy, count, x0, y0, w, h, region, cell) -> Hotspot:
  """The middle of the placements that hold the same points as (x0, y0)."""
  inside = ((xy[:, 0] >= x0 - EPS) & (xy[:, 0] <= x0 + w + EPS)
            & (xy[:, 1] >= y0 - EPS) & (xy[:, 1] <= y0 + h + EPS))
  s = xy[inside]
  left, right = s[:, 0].max() - w, s[:, 0].min()
  top, bottom = s[:, 1].max() - h, s[:, 1].min()
  if region is not None:  # And the centre in a region cell that holds the candidate's centre.
    rows = [int(k[0]) for k in _cells(np.array([y0 + h / 2]), cell, region.shape[0])]
    cols = [int(k[0]) for k in _cells(np.array([x0 + w / 2]), cell, region.shape[1])]
    i, j = next((i, j) for i in rows for j in cols if i >= 0 and j >= 0 and region[i, j])
    left, right = max(left, j * cell - w / 2), min(right, (j + 1) * cell - w / 2)
    top, bottom = max(top, i * cell - h / 2), min(bottom, (i + 1) * cell - h / 2)
  return Hotspot(count, (left + right) / 2, (top + bottom) / 2, w, h)


def count_in_rectangle(xy: np.ndarray, x: float, y: float, w: float, h: float) -> int:
  """Points in the closed rectangle [x, x + w] x [y, y + h] (edges within `EPS`)."""
  xy = np.asarray(xy, np.float64).reshape(-1, 2)
  return int(((xy[:, 0] >= x - EPS) & (xy[:, 0] <= x + w + EPS) & (xy[:, 1] >= y - EPS)
              & (xy[:, 1] <= y + h + EPS)).sum())


def density(xy: np.ndarray, shape: tuple[int, int], cell: int, um_per_px: float,
            sigma_mm: float = 0.25) -> np.ndarray:
  """Figures per mm² on the cell grid [rows, cols], smoothed by a Gaussian of `sigma_mm`."""
  xy = np.asarray(xy, np.float64).reshape(-1, 2)
  hist = np.zeros(shape, np.float64)
  i = np.clip((xy[:, 1] // cell).astype(np.int64), 0, shape[0] - 1)
  j = np.clip((xy[:, 0] // cell).astype(np.int64), 0, shape[1] - 1)
  np.add.at(hist, (i, j), 1.0)
  cell_mm = cell * um_per_px / 1000
  smooth = ndimage.gaussian_filter(hist, sigma_mm / cell_mm, mode="constant")
  return smooth / cell_mm ** 2
