"""The files of a counted slide and of a batch (the list: `slides.py`).

The per-slide detections in the field's formats (MIDOG JSON, QuPath GeoJSON,
CSV), the analysed region, picture.png (thumbnail, tissue, where the figures
are, the hotspot), the one-line description and the batch's summary.csv.
"""

from __future__ import annotations

import io
import math
import os
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from midog_jax import atomic
from midog_jax.data import slide_reader
from midog_jax.detection import hotspot as hotspot_lib
from midog_jax.detection import predictions

SUMMARY_COLUMNS = ("slide", "tissue_mm2", "figures", "figures_per_mm2", "hotspot_figures",
                   "hotspot_x_mm", "hotspot_y_mm", "um_per_px", "seconds")

PICTURE_PX = 1200  # Long side of the picture's thumbnail.


def thumbnail(slide: slide_reader.Slide, thumb: np.ndarray, cell: int) -> tuple[np.ndarray, int]:
  """(image, level-0 px per pixel) for the picture: the mask's thumbnail where it is
  fine enough, else one read at about `PICTURE_PX` px."""
  d = max(1, math.ceil(max(slide.width, slide.height) / PICTURE_PX))
  if d >= cell:
    step = d // cell
    return thumb[::step, ::step], cell * step
  return slide.thumbnail(d), d


def write_picture(path: str, title: str, width: int, height: int, picture: np.ndarray, picture_px: int,
          region: np.ndarray, cell: int, figures: np.ndarray, spot: hotspot_lib.Hotspot,
          um: float) -> None:
  """Thumbnail, tissue outline (green), figure density heatmap, hotspot (orange), for a
  slide of `width` x `height` level-0 px at `um` µm/px, with `title` above."""
  h, w = picture.shape[:2]
  fig = Figure(figsize=(max(w, 640) / 100, max(h, 200) / 100 + 0.4), dpi=100)
  ax = fig.add_axes([0, 0, 1, 1 - 0.4 / (max(h, 200) / 100 + 0.4)])
  ax.imshow(picture, extent=(0, w * picture_px, h * picture_px, 0))  # Level-0 px.
  rows, cols = region.shape
  if region.any():
    ax.contour((np.arange(cols) + 0.5) * cell, (np.arange(rows) + 0.5) * cell,
               region.astype(float), levels=[0.5], colors="lime", linewidths=1.0)
  # Smoothed over 0.25 mm, less on a slide only a few mm across.
  sigma_mm = min(0.25, max(width, height) * um / 1000 / 30)
  dens = hotspot_lib.density(figures, region.shape, cell, um, sigma_mm)
  if dens.max() > 0:
    ax.imshow(np.ma.masked_less(dens, dens.max() * 0.2), cmap="inferno", alpha=0.5,
              extent=(0, cols * cell, rows * cell, 0))
  if spot.x is not None:
    ax.add_patch(Rectangle((spot.x, spot.y), spot.w, spot.h, fill=False, edgecolor="orange",
                           linewidth=2))
  ax.set_xlim(0, width)
  ax.set_ylim(height, 0)
  ax.set_axis_off()
  fig.text(0.01, 1 - 0.2 / (max(h, 200) / 100 + 0.4), title, fontsize=8, va="center")
  atomic.write_figure(path, fig)


def write(folder: str, report: dict, picture: tuple[np.ndarray, int], region: np.ndarray,
          cell: int, xy: np.ndarray, scores: np.ndarray, counted: np.ndarray,
          spot: hotspot_lib.Hotspot, um: float) -> None:
  """Every per-slide file but report.json (written last, by `slides.process_slide`)."""
  name = report["slide"]
  predictions.write_predictions(os.path.join(folder, "detections.json"), {name: (xy, scores)},
                                {name: um})
  predictions.write_geojson(os.path.join(folder, "detections.geojson"), xy[counted],
                            scores[counted])
  features = [] if spot.x is None else [{
      "type": "Feature",
      "geometry": {"type": "Polygon", "coordinates": [[
          [spot.x, spot.y], [spot.x + spot.w, spot.y], [spot.x + spot.w, spot.y + spot.h],
          [spot.x, spot.y + spot.h], [spot.x, spot.y]]]},
      "properties": {"objectType": "annotation",
                     "classification": {"name": "Hotspot", "color": [255, 200, 0]},
                     "measurements": {"mitotic figures": spot.count}}}]
  atomic.write_json(os.path.join(folder, "hotspot.geojson"),
                    {"type": "FeatureCollection", "features": features}, indent=None)
  mm = um / 1000
  lines = ["x_px,y_px,x_mm,y_mm,probability,counted"] + [
      f"{x:.1f},{y:.1f},{x * mm:.5f},{y * mm:.5f},{s:.4f},{int(c)}"
      for (x, y), s, c in zip(xy, scores, counted)]
  atomic.write_text(os.path.join(folder, "detections.csv"), "\n".join(lines) + "\n")
  buffer = io.BytesIO()
  Image.fromarray(region).save(buffer, format="PNG")
  atomic.write_bytes(os.path.join(folder, "tissue.png"), buffer.getbuffer())
  write_picture(os.path.join(folder, "picture.png"), describe(report).split(";")[0],
                report["width"], report["height"], *picture, region, cell, xy[counted], spot, um)


def describe(report: dict) -> str:
  """One line about a slide's result."""
  rate, spot = report["figures_per_mm2"], report["hotspot"]
  where = ("" if spot["centre_mm"] is None
           else " at ({:.2f}, {:.2f}) mm".format(*spot["centre_mm"]))
  return (f"{report['slide']}: {report['figures']} figures in {report['tissue']['mm2']:.3g} mm² "
          f"of tissue ({'-' if rate is None else f'{rate:.3g}'}/mm²), hotspot "
          f"{spot['figures']} in {spot['area_mm2']:g} mm²{where}; {report['um_per_px']:g} µm/px"
          f"{' (resampled)' if report['resampled'] else ''}, {report['seconds']:.0f} s"
          f"{' (done before)' if report.get('reused') else ''}")


def summary_row(report: dict) -> list[str]:
  """The report's row of summary.csv."""
  def fmt(v, digits):
    return "" if v is None else f"{v:.{digits}f}"
  centre = report["hotspot"]["centre_mm"] or (None, None)
  return [report["slide"], fmt(report["tissue"]["mm2"], 4), str(report["figures"]),
          fmt(report["figures_per_mm2"], 3), str(report["hotspot"]["figures"]),
          fmt(centre[0], 3), fmt(centre[1], 3), fmt(report["um_per_px"], 4),
          fmt(report["seconds"], 1)]


def write_summary(path: str, reports: Sequence[dict]) -> None:
  """summary.csv: one row per slide, in the batch's order."""
  rows = [",".join(SUMMARY_COLUMNS)] + [
      ",".join(f'"{c}"' if "," in c else c for c in summary_row(r)) for r in reports]
  atomic.write_text(path, "\n".join(rows) + "\n")
