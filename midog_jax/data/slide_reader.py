"""Whole-slide images, read window by window: OpenSlide's formats and TIFF regions of interest.

`open_slide` opens every format OpenSlide reads (openslide-python, with the
library openslide-bin ships) and, for the TIFFs OpenSlide refuses (the
striped single-page MIDOG++ ROIs), the project's ROI reader. A `Slide` reads
level-0 regions from any thread, a box-filtered thumbnail at an integer
downsample, its µm/px from the file's properties and an identity that
survives copying. `read_window` resamples a window to another resolution;
`tissue_mask` finds tissue on a thumbnail; `parse_roi` reads the region to
analyse, a rectangle or QuPath's polygon annotations.
"""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import openslide
import tifffile
from PIL import Image
from scipy import ndimage

from midog_jax import atomic
from midog_jax.data import normalization
from midog_jax.data import roi_io

SUPPORTED = ("the formats OpenSlide reads (Aperio .svs, Hamamatsu .ndpi/.vms, Leica .scn, "
             "MIRAX .mrxs, Philips .tiff, Sakura .svslide, Ventana .bif, Zeiss .czi, DICOM, "
             "generic tiled .tif) and TIFF regions of interest (.tiff as MIDOG++'s)")
MAX_ROI_BYTES = 2 ** 31  # A TIFF OpenSlide refuses is read whole: up to this size decoded.
_THUMB_CHUNK = 512  # Thumbnail pixels per side read at a time.
_MAX_ANISOTROPY = 0.02  # x and y resolutions may differ by this fraction.
RESOLUTION_TOLERANCE = 0.1  # Within 10 % of the training resolutions: read as it is.
COARSEST_UM_PER_PX = 0.6  # Coarser than a 20x scan: figures are a few pixels wide.
MAX_DOWNSAMPLE = 4.0  # Finer than a quarter of the training resolution: refused.

# Tissue on a thumbnail (see `tissue_mask`): saturation on the 0-255 scale.
_SAT_FLOOR, _SAT_CEIL = 12, 30  # Otsu's threshold is clipped into this range.
_MIN_TISSUE_MM2 = 0.002  # Smaller specks (under about 45 x 45 µm) are dust.
_MAX_HOLE_MM2 = 0.05  # Smaller holes inside tissue are filled.


class SlideError(ValueError):
  """A slide that cannot be used; the message names the file and the remedy."""


class Slide:
  """A slide's level 0: size, resolution, regions, thumbnails."""
  path: str
  vendor: str  # OpenSlide's vendor (e.g. "aperio", "generic-tiff"), or "tiff-roi".
  width: int
  height: int
  um_per_px: float | None  # None where the file does not say.
  identity: str  # Same pixels, same identity, wherever the file lies.

  def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
    """Level-0 pixels [h, w, 3] uint8 at (x, y); outside the slide is white."""
    raise NotImplementedError

  def thumbnail(self, downsample: int) -> np.ndarray:
    """[ceil(H / d), ceil(W / d), 3] uint8: each pixel the mean of a d x d block of level 0."""
    raise NotImplementedError

  def close(self) -> None:
    pass

  def __enter__(self) -> "Slide":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _on_white(rgba: np.ndarray) -> np.ndarray:
  """RGBA (not premultiplied, as OpenSlide returns it) composited onto white."""
  if rgba[..., 3].min() == 255:
    return np.ascontiguousarray(rgba[..., :3])
  a = rgba[..., 3:].astype(np.float32) / 255.0
  return np.round(rgba[..., :3] * a + 255.0 * (1 - a)).astype(np.uint8)


def _file_digest(path: str) -> str:
  """Size and the first and last MiB: cheap, and changes when the file does."""
  size = os.path.getsize(path)
  h = hashlib.sha256(str(size).encode())
  with open(path, "rb") as f:
    h.update(f.read(1 << 20))
    f.seek(max(0, size - (1 << 20)))
    h.update(f.read(1 << 20))
  return h.hexdigest()[:20]


def _mpp(props, path: str) -> float | None:
  try:
    x, y = (float(props[k]) for k in (openslide.PROPERTY_NAME_MPP_X,
                                      openslide.PROPERTY_NAME_MPP_Y))
  except (KeyError, ValueError):
    return None
  if not (x > 0 and y > 0 and math.isfinite(x) and math.isfinite(y)):
    return None
  if abs(x - y) > _MAX_ANISOTROPY * max(x, y):
    raise SlideError(f"{path}: pixels are not square ({x:g} x {y:g} µm); rescan or convert "
                     "the slide to square pixels")
  return (x + y) / 2


class OpenSlideSlide(Slide):
  """A slide in one of OpenSlide's formats."""

  def __init__(self, path: str, vendor: str):
    self.path, self.vendor = path, vendor
    self._osr = openslide.OpenSlide(path)
    self.width, self.height = self._osr.dimensions
    self.um_per_px = _mpp(self._osr.properties, path)
    quick = self._osr.properties.get(openslide.PROPERTY_NAME_QUICKHASH1)
    self.identity = (hashlib.sha256(f"{vendor}:{quick}".encode()).hexdigest()[:20] if quick
                     else _file_digest(path))

  def _region(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
    try:
      region = self._osr.read_region((int(x), int(y)), level, (int(w), int(h)))
    except (openslide.OpenSlideError, OSError) as e:
      raise SlideError(f"{self.path}: reading level {level} at ({x}, {y}) failed ({e}); the "
                       "file may be damaged") from None
    return _on_white(np.asarray(region))

  def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
    return self._region(x, y, 0, w, h)

  def thumbnail(self, downsample: int) -> np.ndarray:
    d = int(downsample)
    level = self._osr.get_best_level_for_downsample(d)
    ld = self._osr.level_downsamples[level]
    out = np.empty((-(-self.height // d), -(-self.width // d), 3), np.uint8)
    c = _THUMB_CHUNK
    for ty in range(0, out.shape[0], c):
      for tx in range(0, out.shape[1], c):
        ch, cw = min(c, out.shape[0] - ty), min(c, out.shape[1] - tx)
        size = (math.ceil(cw * d / ld), math.ceil(ch * d / ld))
        rgb = Image.fromarray(self._region(tx * d, ty * d, level, *size))
        out[ty:ty + ch, tx:tx + cw] = np.asarray(
            rgb.resize((cw, ch), Image.Resampling.BOX, box=(0, 0, cw * d / ld, ch * d / ld)))
    return out

  def close(self) -> None:
    self._osr.close()


class TiffRoiSlide(Slide):
  """A TIFF OpenSlide refuses (striped, as the MIDOG++ ROIs): read whole by `roi_io`."""

  def __init__(self, path: str):
    self.path, self.vendor = path, "tiff-roi"
    try:
      with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        level = series.levels[0] if series.levels else series
        nbytes = int(np.prod(level.shape))
    except (tifffile.TiffFileError, ValueError, OSError, EOFError, IndexError) as e:
      raise SlideError(f"{path}: not a readable TIFF ({e}); supported: {SUPPORTED}") from None
    if nbytes > MAX_ROI_BYTES:
      raise SlideError(
          f"{path}: a {nbytes / 2 ** 30:.1f} GiB TIFF that OpenSlide cannot read (not tiled); "
          "convert it to a tiled pyramid, e.g. `vips tiffsave IN OUT.tif --tile --pyramid "
          "--compression jpeg`")
    try:
      self.um_per_px = roi_io.read_um_per_px(path)
      self._image = roi_io.read_roi(path)
    except roi_io.RoiError as e:
      raise SlideError(str(e)) from None
    self.height, self.width = self._image.shape[:2]
    self.identity = _file_digest(path)

  def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
    out = np.full((h, w, 3), 255, np.uint8)
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + w, self.width), min(y + h, self.height)
    if x0 < x1 and y0 < y1:
      out[y0 - y:y1 - y, x0 - x:x1 - x] = self._image[y0:y1, x0:x1]
    return out

  def thumbnail(self, downsample: int) -> np.ndarray:
    d = int(downsample)
    w, h = -(-self.width // d), -(-self.height // d)
    padded = self.read(0, 0, w * d, h * d)  # White past the edges, as OpenSlide's.
    return np.asarray(Image.fromarray(padded).resize((w, h), Image.Resampling.BOX))


def _is_tiff(path: str) -> bool:
  with open(path, "rb") as f:
    return f.read(4) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def open_slide(path: str | os.PathLike[str]) -> Slide:
  """The slide at `path`: OpenSlide where it reads the format, else a TIFF ROI.

  Raises:
    SlideError: missing, unreadable or unsupported file (naming the formats read).
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise SlideError(f"{path}: no such file")
  try:
    vendor = openslide.OpenSlide.detect_format(path)
  except (openslide.OpenSlideError, OSError) as e:
    raise SlideError(f"{path}: cannot be read ({e})") from None
  if vendor is not None:
    try:
      return OpenSlideSlide(path, vendor)
    except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError) as e:
      raise SlideError(f"{path}: OpenSlide's {vendor} reader cannot read it ({e}); the file "
                       "may be truncated or its companion files missing") from None
  if os.path.isfile(path) and _is_tiff(path):
    return TiffRoiSlide(path)
  raise SlideError(f"{path}: not a slide format this reads; supported: {SUPPORTED}")


def frame_scale(um_per_px: float, trained: tuple[float, float], path: str = "slide") -> float:
  """Level-0 px per px of the frame the network sees: 1 within 10 % of the training
  resolutions `trained` (min, max µm/px), else the nearest of them / `um_per_px`.

  Raises:
    SlideError: coarser than 0.6 µm/px (below 20x) or finer than a quarter of the
      training resolution.
  """
  lo, hi = trained
  if lo * (1 - RESOLUTION_TOLERANCE) <= um_per_px <= hi * (1 + RESOLUTION_TOLERANCE):
    return 1.0
  if um_per_px > COARSEST_UM_PER_PX:
    raise SlideError(
        f"{path}: {um_per_px:g} µm/px is coarser than a 20x scan ({COARSEST_UM_PER_PX} µm/px); "
        f"the network was trained at {lo:g}-{hi:g} µm/px (40x), where mitotic figures are "
        "resolved: rescan at 40x (or 20x), or give the right --um-per-px if the slide's is wrong")
  target = min(max(um_per_px, lo), hi)
  if target / um_per_px > MAX_DOWNSAMPLE:
    raise SlideError(f"{path}: {um_per_px:g} µm/px is finer than a quarter of the training "
                     f"resolution ({lo:g}-{hi:g} µm/px); export the slide at about {hi:g} µm/px")
  return target / um_per_px


def read_window(slide: Slide, x: int, y: int, patch: int, scale: float = 1.0) -> np.ndarray:
  """uint8 [patch, patch, 3]: the window at (x, y) of a frame `scale` level-0 px per px.

  Pixel (i, j) of the frame covers level-0 [j * scale, (j + 1) * scale) in x;
  `scale` 0.5 enlarges a 0.5 µm/px slide to 0.25 µm/px (bilinear).
  """
  if scale == 1.0:
    return slide.read(x, y, patch, patch)
  bx, by, size = x * scale, y * scale, patch * scale
  x0, y0 = math.floor(bx) - 1, math.floor(by) - 1  # One pixel of support each side.
  w, h = math.ceil(bx + size) + 1 - x0, math.ceil(by + size) + 1 - y0
  region = Image.fromarray(slide.read(x0, y0, w, h))
  box = (bx - x0, by - y0, bx - x0 + size, by - y0 + size)
  return np.asarray(region.resize((patch, patch), Image.Resampling.BILINEAR, box=box))


def otsu_threshold(values: np.ndarray) -> int:
  """Otsu's threshold of uint8-range values: the t maximising the between-class variance
  of (< t, >= t)."""
  hist = np.bincount(np.clip(values, 0, 255).astype(np.int64).ravel(), minlength=256)
  hist = hist.astype(np.float64)
  w0 = np.cumsum(hist)[:-1]  # Class below t = 1..255.
  total = hist.sum()
  w1 = total - w0
  m = np.cumsum(hist * np.arange(256))[:-1]
  mu0 = m / np.maximum(w0, 1)
  mu1 = (m[-1] + 255 * hist[-1] - m) / np.maximum(w1, 1)
  between = w0 * w1 * (mu0 - mu1) ** 2
  return int(np.argmax(between)) + 1


def tissue_mask(thumb: np.ndarray, um_per_cell: float) -> np.ndarray:
  """True where a thumbnail (each pixel `um_per_cell` µm wide) shows tissue.

  Tissue is saturated (Otsu's threshold on saturation, clipped to 12..30 of
  255) and passes the tissue rule of `normalization.tissue_mask`; pen ink
  (green or blue: G > R + 10 or B > R + 30; H&E is redder than both) and
  near-black specks (max channel < 40) are not tissue. Holes under 0.05 mm²
  are filled, pieces under 0.002 mm² dropped.
  """
  rgb = thumb.astype(np.int16)
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  mx, mn = rgb.max(-1), rgb.min(-1)
  sat = (mx - mn) * 255 // np.maximum(mx, 1)
  threshold = int(np.clip(otsu_threshold(sat), _SAT_FLOOR, _SAT_CEIL))
  pen = (g > r + 10) | (b > r + 30) | (mx < 40)
  mask = (sat >= threshold) & normalization.tissue_mask(thumb) & ~pen
  cell_mm2 = (um_per_cell / 1000) ** 2
  mask = ndimage.binary_closing(mask, iterations=1, border_value=0) | mask
  holes = ndimage.binary_fill_holes(mask) & ~mask
  labels, n = ndimage.label(holes)
  if n:
    sizes = np.bincount(labels.ravel())[1:] * cell_mm2
    mask |= np.isin(labels, np.nonzero(sizes < _MAX_HOLE_MM2)[0] + 1)
  labels, n = ndimage.label(mask)
  if n:
    sizes = np.bincount(labels.ravel())[1:] * cell_mm2
    mask = np.isin(labels, np.nonzero(sizes >= _MIN_TISSUE_MM2)[0] + 1)
  return mask


def read_roi_geojson(path: str) -> tuple:
  """The polygons (exterior rings, level-0 px) of a QuPath GeoJSON export of annotations."""
  try:
    data = atomic.read_json(path)
  except (OSError, ValueError) as e:
    raise ValueError(f"--roi {path}: not a readable GeoJSON file ({e})") from None
  features = data.get("features", [data]) if isinstance(data, dict) else data
  rings = []
  try:
    for f in features if isinstance(features, list) else []:
      g = (f.get("geometry") or {}) if isinstance(f, dict) else {}
      polys = {"Polygon": [g.get("coordinates")], "MultiPolygon": g.get("coordinates")}.get(
          g.get("type"), [])
      for poly in polys or []:
        ring = tuple((float(p[0]), float(p[1])) for p in poly[0])  # The exterior ring.
        rings += [ring] if len(ring) >= 3 else []
  except (TypeError, ValueError, IndexError, KeyError) as e:
    raise ValueError(f"--roi {path}: a polygon's coordinates are not [[x, y], ...] "
                     f"({type(e).__name__}: {e})") from None
  if not rings:
    raise ValueError(f"--roi {path}: no Polygon or MultiPolygon annotation in it; export the "
                     "annotation from QuPath (File > Export objects as GeoJSON)")
  return tuple(rings)


def parse_roi(text: str | None) -> tuple[tuple | None, tuple]:
  """--roi: (x, y, w, h) from "x,y,w,h" (level-0 px), or polygon rings from a GeoJSON file."""
  if text is None:
    return None, ()
  if os.path.exists(text) or text.lower().endswith((".geojson", ".json")):
    return None, read_roi_geojson(text)
  try:
    x, y, w, h = (float(v) for v in text.split(","))
  except ValueError:
    x = y = w = h = -1.0
  if not (w > 0 and h > 0 and x >= 0 and y >= 0):
    raise ValueError(f"--roi {text}: expected x,y,w,h in level-0 px (w, h > 0) or a QuPath "
                     "GeoJSON file")
  return (x, y, w, h), ()


def mask_downsample(um_per_px: float, um_per_cell: float = 8.0) -> int:
  """Level-0 pixels per tissue-mask cell: the power of two nearest `um_per_cell` µm."""
  return max(1, 2 ** int(round(math.log2(um_per_cell / um_per_px))))
