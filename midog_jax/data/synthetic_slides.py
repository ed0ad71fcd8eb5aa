"""Synthetic whole-slide images: tissue islands on glass, figures and imposters at known places.

A slide is rendered tile by tile (memory: one tile and the lower levels, about
1/16 of level 0) with the stains, nuclei, mitotic figures and imposters of
`data/synthetic`, and written as a tiled pyramidal TIFF (OpenSlide's
generic-tiff driver) or an Aperio-style SVS (a TIFF whose ImageDescription
starts "Aperio" and holds "MPP = ", read by OpenSlide's aperio driver), both
with resolution tags. Levels are 4x apart. A `<stem>.truth.json` beside the
slide lists the figures and imposters (level-0 px) and the tissue area.
Same spec, same pixels.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Iterator

import numpy as np
import tifffile
from scipy import ndimage
from scipy.spatial import cKDTree

from midog_jax import atomic
from midog_jax import domains
from midog_jax.data import synthetic

FORMATS = ("tiff", "svs")
FIELD_UM = 8.0  # Size of one cell of the low-resolution tissue field.
_LEVEL_STEP = 4  # Downsample between pyramid levels, as Aperio scanners write them.
_MIN_LEVEL_PX = 512  # Lower levels are added while the level is at least this long.
_MIN_OBJECT_DISTANCE_UM = 6.0  # Between two annotated objects (24 px at 0.25 µm/px).
_EDGE_MARGIN_UM = 24.0  # Objects lie this far inside the tissue edge.


@dataclasses.dataclass(frozen=True)
class SlideSpec:
  """What a synthetic slide shows; every field changes its pixels."""
  width: int
  height: int
  um_per_px: float = 0.25
  seed: int = 0
  domain: str = "1c"  # Stain of this MIDOG++ domain (data/synthetic's model).
  tissue_fraction: float = 0.4
  islands: int = 4
  figures_per_mm2: float = 10.0
  imposters_per_mm2: float = 10.0
  cluster_fraction: float = 0.3  # Share of the figures crowded around one spot (a hotspot).
  nucleus_radius_um: float = 3.0
  nucleus_spacing_um: float = 11.0
  tile: int = 256

  @property
  def field_downsample(self) -> int:
    """Level-0 pixels per cell of the tissue field (a power of two near 8 µm)."""
    return max(1, 2 ** int(round(math.log2(FIELD_UM / self.um_per_px))))


@dataclasses.dataclass
class SlideTruth:
  """Where the objects of a synthetic slide are, in level-0 pixels."""
  width: int
  height: int
  um_per_px: float
  figures: np.ndarray  # [N, 2] (x, y).
  imposters: np.ndarray  # [M, 2].
  tissue: np.ndarray  # bool [ceil(H / d), ceil(W / d)]: the tissue field's cells.
  field_downsample: int

  @property
  def tissue_mm2(self) -> float:
    return float(self.tissue.sum()) * (self.field_downsample * self.um_per_px / 1000) ** 2

  def to_json(self) -> dict:
    return {"width": self.width, "height": self.height, "um_per_px": self.um_per_px,
            "tissue_mm2": self.tissue_mm2,
            "figures": self.figures.round(2).tolist(),
            "imposters": self.imposters.round(2).tolist()}


def truth_path(slide_path: str) -> str:
  """`dir/a.svs` -> `dir/a.truth.json`."""
  return os.path.splitext(slide_path)[0] + ".truth.json"


def _islands(spec: SlideSpec, rng: np.random.Generator) -> np.ndarray:
  """A smooth field on the cell grid whose top `tissue_fraction` is tissue, glass at the border."""
  d = spec.field_downsample
  gh, gw = -(-spec.height // d), -(-spec.width // d)
  yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float32)
  field = np.zeros((gh, gw), np.float32)
  for _ in range(spec.islands):
    cx, cy = rng.uniform(0.2, 0.8) * gw, rng.uniform(0.2, 0.8) * gh
    rx, ry = rng.uniform(0.12, 0.3) * gw, rng.uniform(0.12, 0.3) * gh
    field = np.maximum(field, np.exp(-((xx - cx) / rx) ** 2 - ((yy - cy) / ry) ** 2))
  # Ragged edges: low-frequency noise over a few hundred µm.
  noise = ndimage.gaussian_filter(rng.random((gh, gw)).astype(np.float32), max(1.0, gw / 40))
  noise = (noise - noise.mean()) / (noise.std() + 1e-9)
  field = field + 0.08 * noise
  taper = np.minimum(np.minimum(xx + 0.5, gw - xx - 0.5) / max(gw * 0.04, 1),
                     np.minimum(yy + 0.5, gh - yy - 0.5) / max(gh * 0.04, 1))
  field = field * np.clip(taper, 0, 1)
  level = np.quantile(field, 1 - spec.tissue_fraction)
  return np.clip((field - level) / (field.max() - level + 1e-9), -1, 1)  # > 0: tissue.


def _place(n: int, cells: np.ndarray, spec: SlideSpec, rng: np.random.Generator,
           taken: np.ndarray, centre: np.ndarray | None, sigma_px: float) -> np.ndarray:
  """Up to n points in the allowed cells, apart from each other and from `taken`."""
  d = spec.field_downsample
  min_px = _MIN_OBJECT_DISTANCE_UM / spec.um_per_px
  ys, xs = np.nonzero(cells)
  out: list[tuple[float, float]] = []
  kept = list(map(tuple, taken))
  for _ in range(50):
    if len(out) >= n or not len(xs):
      break
    m = 4 * (n - len(out)) + 8
    if centre is None:
      k = rng.integers(0, len(xs), m)
      cand = np.stack([xs[k] + rng.random(m), ys[k] + rng.random(m)], 1) * d
    else:
      cand = centre + rng.normal(0, sigma_px, (m, 2))
    for x, y in cand:
      cx, cy = int(x // d), int(y // d)
      if not (0 <= cy < cells.shape[0] and 0 <= cx < cells.shape[1] and cells[cy, cx]):
        continue
      if x >= spec.width or y >= spec.height:
        continue
      if kept and np.min(np.hypot(*(np.asarray(kept) - (x, y)).T)) < min_px:
        continue
      out.append((x, y))
      kept.append((x, y))
      if len(out) == n:
        break
  xy = np.asarray(out, np.float64).reshape(-1, 2).round()  # Whole px, as MIDOG++'s.
  return np.minimum(xy, [spec.width - 1, spec.height - 1])


class Scene:
  """A synthetic slide's content; `tile(tx, ty)` renders one level-0 tile."""

  def __init__(self, spec: SlideSpec):
    self.spec = spec
    rng = np.random.default_rng([spec.seed, 0])
    self.field = _islands(spec, rng)
    d = spec.field_downsample
    self.tissue = self.field > 0
    margin = max(1, int(_EDGE_MARGIN_UM / (d * spec.um_per_px)))  # In cells.
    inner = ndimage.binary_erosion(self.tissue, iterations=margin)
    mm2 = float(self.tissue.sum()) * (d * spec.um_per_px / 1000) ** 2
    n_fig = int(round(spec.figures_per_mm2 * mm2))
    n_clustered = int(round(n_fig * spec.cluster_fraction))
    ys, xs = np.nonzero(inner)
    centre = (np.array([xs[len(xs) // 2], ys[len(ys) // 2]], np.float64) * d if len(xs)
              else None)
    sigma = 150.0 / spec.um_per_px  # A crowded spot about 0.3 mm across.
    crowded = _place(n_clustered, inner, spec, rng, np.zeros((0, 2)), centre, sigma)
    spread = _place(n_fig - len(crowded), inner, spec, rng, crowded, None, 0)
    self.figures = np.concatenate([crowded, spread])
    self.imposters = _place(int(round(spec.imposters_per_mm2 * mm2)), inner, spec, rng,
                            self.figures, None, 0)
    self.objects = np.concatenate([self.figures, self.imposters])
    self._tree = cKDTree(self.objects) if len(self.objects) else None
    dom = domains.domain(spec.domain)
    self.h_vec, self.e_vec = (v.astype(np.float32) for v in synthetic.stain(dom, rng))
    self.radius = spec.nucleus_radius_um / spec.um_per_px
    self.bank = [synthetic.nucleus(self.radius, rng) for _ in range(24)]
    self.margin = int(math.ceil(self.radius * 1.2 * 1.6 + 4))  # Largest sprite's half size.

  def truth(self) -> SlideTruth:
    s = self.spec
    return SlideTruth(s.width, s.height, s.um_per_px, self.figures, self.imposters,
                      self.tissue, s.field_downsample)

  def _field_at(self, x0: int, y0: int, n: int) -> np.ndarray:
    """The tissue field, bilinear at the pixel centres of an n x n tile at (x0, y0)."""
    d = self.spec.field_downsample

    def axis(start, size):
      u = (np.arange(start, start + n) + 0.5) / d - 0.5
      i = np.clip(np.floor(u).astype(np.int64), 0, size - 1)
      j = np.clip(i + 1, 0, size - 1)
      w = np.clip(u - np.floor(u), 0, 1).astype(np.float32)
      w[u < 0] = 0
      return i, j, w

    yi, yj, wy = axis(y0, self.field.shape[0])
    xi, xj, wx = axis(x0, self.field.shape[1])
    rows = self.field[yi] * (1 - wy)[:, None] + self.field[yj] * wy[:, None]
    return rows[:, xi] * (1 - wx) + rows[:, xj] * wx

  def _nuclei(self, bx: int, by: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions and sprite indices of the ordinary nuclei of one tile-sized block."""
    s, t = self.spec, self.spec.tile
    rng = np.random.default_rng([s.seed, 2, by + 1, bx + 1])  # Blocks from -1.
    n = rng.poisson((t * s.um_per_px / s.nucleus_spacing_um) ** 2)
    xy = (rng.random((n, 2)) + (bx, by)) * t
    kind = rng.integers(0, len(self.bank), n)
    d = s.field_downsample
    cy = np.clip((xy[:, 1] // d).astype(int), 0, self.field.shape[0] - 1)
    cx = np.clip((xy[:, 0] // d).astype(int), 0, self.field.shape[1] - 1)
    keep = self.field[cy, cx] > 0
    if self._tree is not None and n:  # Ordinary nuclei keep off the annotated objects.
      dist, _ = self._tree.query(xy, k=1)
      keep &= dist >= 2.5 * self.radius
    return xy[keep], kind[keep]

  def tile(self, tx: int, ty: int) -> np.ndarray:
    """Level-0 tile (tx, ty) as uint8 RGB [tile, tile, 3] (parts past the slide edge included)."""
    s, t, m = self.spec, self.spec.tile, self.margin
    x0, y0 = tx * t, ty * t
    rng = np.random.default_rng([s.seed, 4, ty, tx])
    field = self._field_at(x0, y0, t)
    haem = np.zeros((t + 2 * m, t + 2 * m), np.float32)  # With a margin for cut sprites.
    for by in (ty - 1, ty, ty + 1):
      for bx in (tx - 1, tx, tx + 1):
        xy, kind = self._nuclei(bx, by)
        near = ((xy[:, 0] >= x0 - m) & (xy[:, 0] < x0 + t + m)
                & (xy[:, 1] >= y0 - m) & (xy[:, 1] < y0 + t + m))
        for (x, y), k in zip(xy[near], kind[near]):
          _stamp(haem, self.bank[k], x - x0 + m, y - y0 + m)
    if self._tree is not None:
      for i in self._tree.query_ball_point((x0 + t / 2, y0 + t / 2), t / 2 ** 0.5 + m):
        x, y = self.objects[i]
        obj_rng = np.random.default_rng([s.seed, 1, i])
        make = synthetic.mitotic_figure if i < len(self.figures) else synthetic.imposter
        _stamp(haem, make(self.radius * 1.2, obj_rng), x - x0 + m, y - y0 + m)
    haem = haem[m:m + t, m:m + t]
    noise = rng.standard_normal((t, t, 1), dtype=np.float32) * 2.0  # Sensor noise.
    if not (field > 0).any() and not haem.any():  # Glass: no stain at all.
      return np.clip(245.0 + noise, 0, 255).astype(np.uint8).repeat(3, axis=2)
    eosin = (0.25 + 0.35 * np.clip(field, 0, 1)) * (field > 0)
    eosin *= 0.8 + 0.2 * rng.random((t, t), dtype=np.float32)
    od = haem[..., None] * self.h_vec + eosin[..., None] * self.e_vec
    rgb = 245.0 * np.exp(-od) + noise
    return np.clip(rgb, 0, 255).astype(np.uint8)

  def region(self, x: int, y: int, w: int, h: int) -> np.ndarray:
    """Level-0 pixels [h, w, 3] of a region inside the slide, assembled from tiles."""
    t = self.spec.tile
    out = np.zeros((h, w, 3), np.uint8)
    for ty in range(y // t, (y + h - 1) // t + 1):
      for tx in range(x // t, (x + w - 1) // t + 1):
        tile = self.tile(tx, ty)
        ys = slice(max(y, ty * t), min(y + h, (ty + 1) * t))
        xs = slice(max(x, tx * t), min(x + w, (tx + 1) * t))
        out[ys.start - y:ys.stop - y, xs.start - x:xs.stop - x] = \
            tile[ys.start - ty * t:ys.stop - ty * t, xs.start - tx * t:xs.stop - tx * t]
    return out


def _stamp(canvas: np.ndarray, sprite: np.ndarray, x: float, y: float) -> None:
  """Max-composites `sprite` centred at (x, y) into `canvas`, clipped to it."""
  r = sprite.shape[0] // 2
  x0, y0 = int(round(x)) - r, int(round(y)) - r
  ys = slice(max(y0, 0), min(y0 + sprite.shape[0], canvas.shape[0]))
  xs = slice(max(x0, 0), min(x0 + sprite.shape[1], canvas.shape[1]))
  if ys.start < ys.stop and xs.start < xs.stop:
    sub = sprite[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
    np.maximum(canvas[ys, xs], sub, out=canvas[ys, xs])


def level_downsamples(width: int, height: int) -> list[int]:
  """Downsamples of the pyramid's levels: 1, 4, 16, ... while a level is >= 512 px long."""
  out = [1]
  while max(width, height) // (out[-1] * _LEVEL_STEP) >= _MIN_LEVEL_PX:
    out.append(out[-1] * _LEVEL_STEP)
  return out


def _reduce(image: np.ndarray, factor: int) -> np.ndarray:
  """Box-filter downsample by `factor`, partial blocks at the edges averaged over what they hold."""
  h, w = image.shape[:2]
  hh, ww = -(-h // factor) * factor, -(-w // factor) * factor
  pad = np.pad(image.astype(np.float32), ((0, hh - h), (0, ww - w), (0, 0)))
  count = np.pad(np.ones((h, w, 1), np.float32), ((0, hh - h), (0, ww - w), (0, 0)))
  shape = (hh // factor, factor, ww // factor, factor)
  total = pad.reshape(*shape, 3).sum((1, 3))
  n = count.reshape(*shape, 1).sum((1, 3))
  return np.round(total / n).astype(np.uint8)


def _description(fmt: str, spec: SlideSpec, w: int, h: int, level: int) -> str | None:
  if fmt != "svs":
    return None
  t = spec.tile
  text = f"Aperio Image Library v12.0.15 \r\n{w}x{h} [0,0 {w}x{h}] ({t}x{t})"
  if level == 0:  # The aperio driver reads MPP and AppMag from the first page.
    mag = 40 if spec.um_per_px < 0.375 else 20
    text += f" RAW|AppMag = {mag}|MPP = {spec.um_per_px:.4f}"
  return text


def write_slide(path: str, spec: SlideSpec, fmt: str = "tiff", compression: str = "deflate",
                jpeg_quality: int = 90) -> SlideTruth:
  """Writes a synthetic slide (and `truth_path(path)`) and returns its ground truth.

  `fmt` "tiff" (generic tiled pyramid) or "svs" (Aperio); `compression`
  "deflate" (lossless, the default), "jpeg", "lzw" or None.
  """
  if fmt not in FORMATS:
    raise ValueError(f"unknown slide format {fmt!r}; known: {', '.join(FORMATS)}")
  scene = Scene(spec)
  t = spec.tile
  rows, cols = -(-spec.height // t), -(-spec.width // t)
  downsamples = level_downsamples(spec.width, spec.height)
  lower = {ds: np.zeros((-(-spec.height // ds), -(-spec.width // ds), 3), np.uint8)
           for ds in downsamples[1:2]}  # The first lower level, filled while rendering.

  def tiles() -> Iterator[np.ndarray]:
    for ty in range(rows):
      for tx in range(cols):
        tile = scene.tile(tx, ty)
        for ds, level in lower.items():  # Tiles are multiples of the level step.
          h = min(t, spec.height - ty * t)
          w = min(t, spec.width - tx * t)
          small = _reduce(tile[:h, :w], ds)
          level[ty * t // ds:ty * t // ds + small.shape[0],
                tx * t // ds:tx * t // ds + small.shape[1]] = small
        yield tile

  res = 1e4 / spec.um_per_px  # Pixels per centimetre.
  common = dict(photometric="rgb", compression=compression, metadata=None,
                resolutionunit="CENTIMETER",
                compressionargs={"level": jpeg_quality} if compression == "jpeg" else None)
  bigtiff = spec.width * spec.height * 3 > 2 ** 31
  tmp = f"{path}.tmp"  # Renamed when whole: a killed writer leaves no half slide.
  try:
    _write_levels(tmp, scene, fmt, tiles(), lower, downsamples, bigtiff, res, common)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  truth = scene.truth()
  atomic.write_json(truth_path(path), truth.to_json(), indent=None)
  return truth


def _write_levels(tmp, scene, fmt, tiles, lower, downsamples, bigtiff, res, common) -> None:
  """Level 0 from the tile iterator, then the lower levels, into `tmp`."""
  spec, t = scene.spec, scene.spec.tile
  with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif:
    tif.write(tiles, shape=(spec.height, spec.width, 3), dtype=np.uint8, tile=(t, t),
              resolution=(res, res), description=_description(fmt, spec, spec.width,
                                                              spec.height, 0), **common)
    level = None
    for k, ds in enumerate(downsamples[1:], start=1):
      level = lower[ds] if level is None else _reduce(level, _LEVEL_STEP)
      tif.write(level, tile=(t, t), subfiletype=1, resolution=(res / ds, res / ds),
                description=_description(fmt, spec, level.shape[1], level.shape[0], k),
                **common)


def render(spec: SlideSpec) -> np.ndarray:
  """The whole level 0 [H, W, 3] as `write_slide` writes it (small slides: tests)."""
  return Scene(spec).region(0, 0, spec.width, spec.height)
