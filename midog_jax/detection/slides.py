"""Whole slides to mitotic counts: windows over tissue, bands that resume, per-slide outputs.

For each slide (`process_slide`): open it (data/slide_reader), take the frame
the run was trained at (resampling where the slide's µm/px differs), find
tissue on a thumbnail, keep the windows of the run's sliding-window grid that
touch the analysed region (tissue, within --roi), read them in worker threads
and detect them in batches. Each band of windows is saved when done, so an
interrupted slide resumes from its last band; a finished slide (its
report.json, written last, under the same key) is never computed again.
Then the distance suppression across window seams (for an ensemble, each
member's, then their fusion: detection/ensemble), the counts and the
hotspot (detection/hotspot), and the outputs (detection/slide_outputs),
each written by temp + rename:

  OUT/<stem>/detections.json    MIDOG JSON (mm): every detection above the minimum score
            /detections.geojson QuPath: the counted figures (px), probability as a measurement
            /hotspot.geojson    QuPath: the hotspot rectangle
            /detections.csv     every detection: px, mm, probability, counted
            /tissue.png         the analysed region, one pixel per mask cell
            /picture.png        thumbnail, tissue outline, density heatmap, hotspot
            /report.json        counts, hotspot, resolution, settings, seconds
            /bands/             the saved bands (kept: a new operating point reuses them)
  OUT/summary.csv               one row per slide of the batch
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import json
import math
import os
import time
from typing import Any, Callable, Sequence

import numpy as np

from midog_jax import atomic
from midog_jax import console
from midog_jax import domains
from midog_jax.data import slide_reader
from midog_jax.detection import detector as detector_lib
from midog_jax.detection import ensemble
from midog_jax.detection import hotspot as hotspot_lib
from midog_jax.detection import slide_outputs
from midog_jax.detection import sliding_window

VERSION = 1  # Of the band and report layout; a change recomputes.
OVERLAP = 0.1  # The reference's window overlap (at least the run's min overlap).
IN_FLIGHT = 2  # Batches dispatched to the device and not yet brought back: bounds host memory.
# (windows uint8 [B, P, P, 3], origins [B, 2] in the frame) -> (centres [B, K, 2] window px,
# scores [B, K], valid [B, K]), each with a leading member axis [M, ...] for an ensemble;
# real networks ignore the origins, test doubles use them.
WindowFn = Callable[[np.ndarray, np.ndarray], tuple[Any, Any, Any]]


@dataclasses.dataclass
class Model:
  """What the pipeline needs of a detector."""
  fn: WindowFn
  patch: int
  batch_size: int
  min_overlap: int
  min_score: float  # Detections at or below it are not returned.
  trained_um_per_px: tuple[float, float]  # Resolutions of the training images (min, max).
  identity: str  # Changes when the weights do.
  description: dict = dataclasses.field(default_factory=dict)
  # thumbnail -> window -> window: the run's stain normalisation with the params of the
  # slide's low-resolution level (None: windows as read).
  per_slide: Callable[[np.ndarray], Callable[[np.ndarray], np.ndarray]] | None = None
  members: int = 1  # More than one: an ensemble; `fn`'s outputs have the member axis.


@dataclasses.dataclass(frozen=True)
class Settings:
  """How slides are analysed; all but `workers` and `operating_source` is in the keys."""
  operating_point: float
  operating_source: str = "--threshold"
  um_per_px: float | None = None  # Stands in where a slide does not say.
  roi: tuple[float, float, float, float] | None = None  # x, y, w, h in level-0 px.
  roi_polygons: tuple = ()  # Rings of (x, y) level-0 px (from a QuPath GeoJSON).
  hotspot_mm2: float = hotspot_lib.HOTSPOT_MM2
  hotspot_aspect: float = hotspot_lib.HOTSPOT_ASPECT
  band_windows: int = 512
  workers: int = 4


def trained_resolution(config: Any) -> tuple[float, float]:
  """(min, max) µm/px of the scanners of a run's domains (its tumour types, and its
  `domains` where it names some): the one registry, domains.py."""
  slugs = domains.parse_tumor_types(config.tumor_types)
  ids = config.get("domains", "all")
  ids = [i for i in ids.split(",") if i.strip()] if isinstance(ids, str) else list(ids)
  wanted = None if ids in (["all"], []) else {domains.domain(i.strip()).id for i in ids}
  ums = [d.um_per_px for d in domains.DOMAINS
         if d.tumor.slug in slugs and (wanted is None or d.id in wanted)]
  return min(ums), max(ums)


def _key(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _run_identity(run: detector_lib.LoadedRun) -> dict:
  """What identifies a run's detections: its settings and its weights' files."""
  # A run's checkpoint files, or a bundle member's folder.
  ckpt = os.path.join(run.workdir, "checkpoints", str(run.step))
  ckpt = ckpt if os.path.isdir(ckpt) else run.workdir
  files = sorted((os.path.relpath(os.path.join(d, f), ckpt), os.path.getsize(os.path.join(d, f)))
                 for d, _, names in os.walk(ckpt) for f in names)
  stain = run.normalization.stain
  return {"config": run.config.to_dict(), "norm": run.normalization.to_json(),
          "stain": None if stain is None else stain.to_json(), "step": run.step, "files": files}


def _per_slide(stain):
  """The Model's `per_slide` of a run's stain normalisation (None without one)."""
  if stain is None or stain.normalization == "none":
    return None
  def per_slide(thumb):
    params = stain.image_params(thumb)  # Once per slide, from its low-resolution level.
    return lambda window: stain.normalize(window, params)
  return per_slide


def model_from_runs(runs: Sequence[detector_lib.LoadedRun], min_score: float,
                    batch_size: int | None = None) -> Model:
  """The pipeline's view of one loaded run, or of an ensemble (`detection/ensemble.py`:
  every member on each batch of windows, fused after each member's own suppression),
  on every local device."""
  if len(runs) == 1:
    det = detector_lib.Detector(runs[0], min_score, batch_size)
    return Model(lambda windows, origins: det.detect_windows(windows), det.patch,
                 det.batch_size, det.min_overlap, det.threshold,
                 trained_resolution(runs[0].config), _key(_run_identity(runs[0])),
                 {"workdir": runs[0].workdir, "step": runs[0].step},
                 _per_slide(det.stain))
  ens = ensemble.EnsembleDetector(runs, min_score, batch_size)
  ranges = [trained_resolution(r.config) for r in runs]
  return Model(lambda windows, origins: ens.member_windows(windows), ens.patch, ens.batch_size,
               ens.min_overlap, ens.threshold,
               (min(r[0] for r in ranges), max(r[1] for r in ranges)),
               _key([_run_identity(r) for r in runs]),
               {"members": [{"workdir": r.workdir, "step": r.step} for r in runs]},
               _per_slide(ens.stain), members=len(runs))


def select_windows(region: np.ndarray, cell: int, width: int, height: int, scale: float,
                   patch: int, min_overlap: int) -> tuple[np.ndarray, np.ndarray, tuple]:
  """The windows of the grid over the region's bounding box that overlap a region cell.

  Returns frame origins [N, 2] (row-major), the same relative to the box,
  and the box (x0, y0, w, h) in frame px. A frame px is `scale` level-0 px.
  """
  if not region.any():
    return np.zeros((0, 2), np.int64), np.zeros((0, 2), np.int64), (0, 0, 0, 0)
  rows, cols = np.nonzero(region.any(1))[0], np.nonzero(region.any(0))[0]
  lx0, ly0 = cols[0] * cell, rows[0] * cell
  lx1, ly1 = min((cols[-1] + 1) * cell, width), min((rows[-1] + 1) * cell, height)
  fx0, fy0 = math.floor(lx0 / scale), math.floor(ly0 / scale)
  fw, fh = math.ceil(lx1 / scale) - fx0, math.ceil(ly1 / scale) - fy0
  local = sliding_window.window_origins(fw, fh, patch, OVERLAP, min_overlap)
  xy = local + (fx0, fy0)
  sat = np.pad(region.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
  c0 = np.floor(xy * scale / cell).astype(np.int64)  # First cell each window overlaps.
  c1 = np.ceil((xy + patch) * scale / cell).astype(np.int64)  # One past the last.
  c0 = np.clip(c0, 0, region.shape[::-1])
  c1 = np.clip(c1, 0, region.shape[::-1])
  inside = (sat[c1[:, 1], c1[:, 0]] - sat[c0[:, 1], c1[:, 0]] - sat[c1[:, 1], c0[:, 0]]
            + sat[c0[:, 1], c0[:, 0]]) > 0
  return xy[inside], local[inside], (fx0, fy0, fw, fh)


def _load_band(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, float] | None:
  try:
    with np.load(path) as z:
      # A single model's bands have no "member": all its detections are member 0's.
      member = z["member"] if "member" in z else np.zeros(len(z["scores"]), np.int32)
      return z["xy"], z["scores"], member, float(z["seconds"])
  except (OSError, ValueError, KeyError):
    return None  # Never half-written (temp + rename); a foreign file is recomputed.


def _save_band(path: str, xy: np.ndarray, scores: np.ndarray, member: np.ndarray,
               seconds: float) -> None:
  buffer = io.BytesIO()
  arrays = {"xy": xy, "scores": scores, "seconds": np.float64(seconds)}
  if member.any():  # An ensemble's: whose each detection is.
    arrays["member"] = member
  np.savez(buffer, **arrays)
  atomic.write_bytes(path, buffer.getbuffer())


def detect_bands(slide: slide_reader.Slide, model: Model, xy: np.ndarray, local: np.ndarray,
                 box: tuple, scale: float, band_dir: str, settings: Settings, name: str,
                 progress: bool = True, transform: Callable | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, int]:
  """Frame (x, y) [D, 2], scores [D] and member [D] (0 but in an ensemble) of every
  window's detections, before suppression.

  Bands of `band_windows` windows (a multiple of the batch) already saved
  in `band_dir` are loaded, the others detected and saved as each ends.
  Returns also the seconds earlier sessions spent on the bands loaded and
  the windows detected in this call.
  """
  b = model.batch_size
  per_band = max(1, -(-settings.band_windows // b)) * b
  n_bands = -(-len(xy) // per_band)
  paths = [os.path.join(band_dir, f"band_{i:05d}.npz") for i in range(n_bands)]
  done = {i: r for i, p in enumerate(paths) if os.path.exists(p) and (r := _load_band(p))}
  earlier = sum(r[3] for r in done.values())
  todo = [i for i in range(n_bands) if i not in done]
  batches = [(i, s) for i in todo for s in range(i * per_band, min((i + 1) * per_band, len(xy)), b)]
  fx0, fy0, fw, fh = box
  initial = sum(min(per_band, len(xy) - i * per_band) for i in done)
  computed = 0

  def with_members(out):
    """The batch's outputs [M, B, ...]: one model's get the member axis."""
    return out if model.members > 1 else tuple(a[None] for a in out)

  def read(origin):
    window = slide_reader.read_window(slide, int(origin[0]), int(origin[1]), model.patch, scale)
    return window if transform is None else transform(window)

  with concurrent.futures.ThreadPoolExecutor(settings.workers) as pool, \
      console.Progress(len(xy), name, "window", initial=initial, enabled=progress) as bar:
    ahead: collections.deque = collections.deque()

    def submit(k):
      band, start = batches[k]
      ahead.append((band, start, [pool.submit(read, o) for o in xy[start:start + b]]))

    for k in range(min(len(batches), 2 + settings.workers // 2)):  # Read ahead, bounded.
      submit(k)
    outputs, started, next_k = [], time.monotonic(), len(ahead)
    while ahead:
      band, start, futures = ahead.popleft()
      if next_k < len(batches):
        submit(next_k)
        next_k += 1
      windows = np.full((b, model.patch, model.patch, 3), sliding_window.PAD_VALUE, np.uint8)
      for j, f in enumerate(futures):
        windows[j] = f.result()
      n = len(futures)
      origins = np.zeros((b, 2), np.int64)
      origins[:n] = xy[start:start + n]
      # Asynchronous on a device.
      outputs.append((start, n, with_members(model.fn(windows, origins))))
      if len(outputs) > IN_FLIGHT:  # Wait for an older batch: its windows are then freed.
        s, m, out = outputs[-IN_FLIGHT - 1]
        outputs[-IN_FLIGHT - 1] = (s, m, tuple(np.asarray(a)[:, :m] for a in out))
      bar.update(n)
      computed += n
      if not ahead or ahead[0][0] != band:  # The band's last batch: save it.
        found = []
        for s, m, out in outputs:
          out = tuple(np.asarray(a)[:, :m] for a in out)
          for k in range(model.members):
            found.append((*sliding_window.to_image_coordinates(
                local[s:s + m], *(a[k] for a in out), (fh, fw)), k))
        bxy = np.concatenate([f[0] for f in found]).reshape(-1, 2) + (fx0, fy0)
        bsc = np.concatenate([f[1] for f in found])
        bmember = np.concatenate([np.full(len(f[1]), f[2], np.int32) for f in found])
        seconds = time.monotonic() - started
        _save_band(paths[band], bxy, bsc, bmember, seconds)
        done[band] = (bxy, bsc, bmember, seconds)
        outputs, started = [], time.monotonic()
  parts = [done[i] for i in range(n_bands)]
  all_xy = np.concatenate([p[0] for p in parts]).reshape(-1, 2) if parts else np.zeros((0, 2))
  all_sc = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0)
  all_member = (np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.int32))
  return all_xy, all_sc, all_member, earlier, computed


def _state(band_dir: str, key: str) -> None:
  """Bands of another key (slide, model or settings changed) are removed before work."""
  os.makedirs(band_dir, exist_ok=True)
  key_path = os.path.join(band_dir, "key.json")
  old = atomic.read_json(key_path).get("key") if os.path.exists(key_path) else None
  if old != key:
    for f in os.listdir(band_dir):
      if f.startswith("band_") and f.endswith(".npz"):
        os.remove(os.path.join(band_dir, f))
    atomic.write_json(key_path, {"key": key})


def process_slide(path: str, model: Model, settings: Settings, out: str,
                  progress: bool = True) -> dict:
  """Counts the mitotic figures of one slide into `out/<stem>/`; returns its report.

  A slide whose report.json has the same key is not computed again (the
  report comes back with "reused": True).
  """
  t0 = time.monotonic()
  name = os.path.basename(path)
  folder = os.path.join(out, os.path.splitext(name)[0])
  with slide_reader.open_slide(path) as slide:
    um, um_source = slide.um_per_px, "the slide's properties"
    if um is None:
      if settings.um_per_px is None:
        raise slide_reader.SlideError(f"{path}: the slide does not say its resolution; pass "
                                      "--um-per-px (e.g. 0.25 at 40x)")
      um, um_source = settings.um_per_px, "--um-per-px"
    scale = slide_reader.frame_scale(um, model.trained_um_per_px, path)
    cell = slide_reader.mask_downsample(um)
    detect_key = _key({"v": VERSION, "slide": slide.identity, "model": model.identity,
                       "min_score": model.min_score, "um": um, "scale": scale, "cell": cell,
                       "roi": settings.roi, "polygons": settings.roi_polygons,
                       "patch": model.patch, "min_overlap": model.min_overlap,
                       "band": settings.band_windows, "batch": model.batch_size})
    report_key = _key({"detect": detect_key, "op": settings.operating_point,
                       "mm2": settings.hotspot_mm2, "aspect": settings.hotspot_aspect})
    report_path = os.path.join(folder, "report.json")
    if os.path.exists(report_path):
      try:
        old = atomic.read_json(report_path)
      except ValueError:
        old = {}
      if old.get("key") == report_key:
        return {**old, "reused": True}
    thumb = slide.thumbnail(cell)
    tissue = slide_reader.tissue_mask(thumb, cell * um)
    region = tissue & hotspot_lib.roi_cells(tissue.shape, cell, settings.roi,
                                            settings.roi_polygons)
    xy, local, box = select_windows(region, cell, slide.width, slide.height, scale,
                                    model.patch, model.min_overlap)
    band_dir = os.path.join(folder, "bands")
    _state(band_dir, detect_key)
    transform = None if model.per_slide is None or not len(xy) else model.per_slide(thumb)
    raw_xy, raw_scores, raw_member, earlier_seconds, computed = detect_bands(
        slide, model, xy, local, box, scale, band_dir, settings, name, progress, transform)
    width, height, vendor, identity = slide.width, slide.height, slide.vendor, slide.identity
    picture = slide_outputs.thumbnail(slide, thumb, cell)
  if model.members == 1:
    keep = sliding_window.suppress_by_distance(raw_xy, raw_scores)
    det_xy, det_scores = raw_xy[keep], raw_scores[keep]
  else:  # Across seams per member, then across members: as `detect`'s ensembles.
    det_xy, det_scores = ensemble.fuse_members(raw_xy, raw_scores, raw_member, model.members)
  det_xy = det_xy * scale  # Level-0 px.
  counted = (det_scores > settings.operating_point) & hotspot_lib.in_region(det_xy, region, cell)
  area = hotspot_lib.region_mm2(region, cell, um, width, height)
  w, h = hotspot_lib.rectangle_px(settings.hotspot_mm2, settings.hotspot_aspect, um)
  spot = hotspot_lib.best_rectangle(det_xy[counted], w, h, region, cell)
  mm = um / 1000
  report = {
      "slide": name, "path": os.path.abspath(path), "vendor": vendor, "identity": identity,
      "width": width, "height": height, "um_per_px": um, "um_per_px_from": um_source,
      "detected_at_um_per_px": um * scale, "resampled": scale != 1.0,
      "model": model.description, "min_score": model.min_score,
      "operating_point": settings.operating_point,
      "operating_point_from": settings.operating_source,
      "tissue": {"mm2": area, "mask": "tissue.png", "mask_cell_px": cell,
                 "mask_cells": int(region.sum()), "roi": settings.roi,
                 "roi_polygons": len(settings.roi_polygons)},
      "windows": len(xy), "windows_detected_now": computed, "detections": int(len(det_scores)),
      "figures": int(counted.sum()),
      "figures_per_mm2": hotspot_lib.per_mm2(int(counted.sum()), area),
      "hotspot": {"figures": spot.count, "area_mm2": settings.hotspot_mm2,
                  "aspect": settings.hotspot_aspect, "rule": "centre on the analysed tissue",
                  "x_px": spot.x, "y_px": spot.y, "w_px": w, "h_px": h,
                  "centre_mm": None if spot.x is None else [c * mm for c in spot.centre]},
      "key": report_key, "reused": False,
  }
  # Earlier sessions' bands count: the time the slide took, however often it was interrupted.
  report["seconds"] = earlier_seconds + (time.monotonic() - t0)
  slide_outputs.write(folder, report, picture, region, cell, det_xy, det_scores, counted, spot,
                      um)
  atomic.write_json(report_path, report)  # Last: the slide is done.
  return report


def run_batch(paths: Sequence[str], model: Model, settings: Settings, out: str,
              progress: bool = True):
  """Yields (path, report, None) or (path, None, one-line error) per slide, in order;
  summary.csv is rewritten after each, so an interrupted batch keeps its rows."""
  os.makedirs(out, exist_ok=True)
  reports = []
  for path in paths:
    try:
      report = process_slide(path, model, settings, out, progress)
    except slide_reader.SlideError as e:
      yield path, None, str(e)
      continue
    except OSError as e:  # Writing the outputs: a full disk, a folder not writable.
      yield path, None, f"{path}: its outputs could not be written ({e})"
      continue
    reports.append(report)
    slide_outputs.write_summary(os.path.join(out, "summary.csv"), reports)
    yield path, report, None
