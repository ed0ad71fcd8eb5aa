"""MIDOG challenge prediction files: `{file_name: {"points": [...]}}` in mm.

Each point is `{"name": "mitotic figure", "point": [x_mm, y_mm, 0],
"probability": p}`, with mm = px * µm/px / 1000 at the case's resolution.
As the challenge's scorer, a point without "name" counts as a mitotic figure
and one without "probability" gets 0.5; names are compared without regard
to case or surrounding spaces ("Mitotic Figure" counts), points with another
name are left out and counted in a log line. Probabilities must lie in
[0, 1]; coordinates must be non-negative mm inside the image (a point far
outside it is taken for pixels and refused).
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Mapping, NamedTuple

import numpy as np

from midog_jax import atomic

MITOTIC_FIGURE = "mitotic figure"
DEFAULT_PROBABILITY = 0.5  # The reference scorer's value for a missing probability.


class PredictionError(ValueError):
  """Malformed prediction file; the message names the file and the record."""


class Detections(NamedTuple):
  """Detections of one image: xy [D, 2] (px or mm) and scores [D]."""
  xy: np.ndarray
  scores: np.ndarray


def px_to_mm(xy_px: np.ndarray, um_per_px: float) -> np.ndarray:
  return np.asarray(xy_px, np.float64) * (um_per_px / 1000.0)


def mm_to_px(xy_mm: np.ndarray, um_per_px: float) -> np.ndarray:
  return np.asarray(xy_mm, np.float64) * (1000.0 / um_per_px)


def _number(v: Any, where: str, what: str) -> float:
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
    raise PredictionError(f"{where}: {what} {v!r} is not a finite number")
  return float(v)


def _is_mitotic(name: Any) -> bool:
  return isinstance(name, str) and name.strip().lower() == MITOTIC_FIGURE


def _parse_image(entry: Any, where: str, other_names: dict[str, int] | None = None,
                 no_probability: list[int] | None = None) -> Detections:
  if not isinstance(entry, dict) or "points" not in entry:
    raise PredictionError(f"{where}: expected an object with a 'points' list")
  points = entry["points"]
  if not isinstance(points, list):
    raise PredictionError(f"{where}: 'points' is {type(points).__name__}, not a list")
  xy, scores = [], []
  for i, p in enumerate(points):
    w = f"{where}, points[{i}]"
    if not isinstance(p, dict) or "point" not in p:
      raise PredictionError(f"{w}: expected an object with a 'point' [x_mm, y_mm, z]")
    name = p.get("name", MITOTIC_FIGURE)
    if not _is_mitotic(name):
      if other_names is not None:
        other_names[str(name)] = other_names.get(str(name), 0) + 1
      continue
    c = p["point"]
    if not isinstance(c, (list, tuple)) or len(c) not in (2, 3):
      raise PredictionError(f"{w}: 'point' {c!r} is not [x_mm, y_mm, z]")
    x, y = _number(c[0], w, "x"), _number(c[1], w, "y")
    if x < 0 or y < 0:
      raise PredictionError(f"{w}: negative coordinates {c!r}; expected mm from the top left")
    xy.append((x, y))
    if "probability" not in p and no_probability is not None:
      no_probability[0] += 1
    prob = _number(p.get("probability", DEFAULT_PROBABILITY), w, "probability")
    if not 0.0 <= prob <= 1.0:
      raise PredictionError(f"{w}: probability {prob!r} is outside [0, 1]")
    scores.append(prob)
  return Detections(np.asarray(xy, np.float64).reshape(-1, 2),
                    np.asarray(scores, np.float64))


# A point this far past the image's far edge is not in mm (pixels, most likely).
_OUTSIDE_TOLERANCE = 1.1


def read_predictions(
    path: str | os.PathLike[str],
    um_per_px_by_file: Mapping[str, float] | None = None,
    size_px_by_file: Mapping[str, tuple[int, int]] | None = None,
) -> dict[str, Detections]:
  """Reads a prediction file.

  Args:
    path: the JSON file.
    um_per_px_by_file: {file name: µm/px}. With it, coordinates come back in
      pixels and images it does not know are left out with a warning (as the
      challenge's scorer does); without it, coordinates stay in mm.
    size_px_by_file: {file name: (width, height)}; points well outside their
      image are refused as not in mm.
  """
  path = os.fspath(path)
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except FileNotFoundError:
    raise PredictionError(f"{path}: prediction file not found") from None
  except IsADirectoryError:
    raise PredictionError(f"{path}: is a folder; give the prediction JSON file in it") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise PredictionError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(data, dict):
    raise PredictionError(
        f"{path}: expected a JSON object {{file_name: {{\"points\": [...]}}}}, "
        f"got {type(data).__name__}")
  out, unknown, other_names, no_probability = {}, [], {}, [0]
  known_lower = {n.lower(): n for n in um_per_px_by_file or {}}
  for name, entry in data.items():
    det = _parse_image(entry, f"{path}, {name!r}", other_names, no_probability)
    if um_per_px_by_file is None:
      out[name] = det
    elif name in um_per_px_by_file:
      px = mm_to_px(det.xy, um_per_px_by_file[name])
      size = (size_px_by_file or {}).get(name)
      if size is not None and len(px):
        far = np.nonzero((px > np.asarray(size) * _OUTSIDE_TOLERANCE).any(axis=1))[0]
        if len(far):
          x, y = det.xy[far[0]]
          raise PredictionError(
              f"{path}, {name!r}: point ({x:g}, {y:g}) lies outside the image "
              f"({size[0] * um_per_px_by_file[name] / 1000:.3f} x "
              f"{size[1] * um_per_px_by_file[name] / 1000:.3f} mm); coordinates must be "
              "in mm, not pixels (mm = px * µm/px / 1000)")
      out[name] = Detections(px, det.scores)
    elif name.lower() in known_lower:
      raise PredictionError(
          f"{path}: image {name!r} is not in the annotations, but {known_lower[name.lower()]!r} "
          "is; file names are case-sensitive: rename the keys to the annotations' file names")
    else:
      unknown.append(name)
  if no_probability[0]:
    logging.warning("%s: %d point(s) without a 'probability' count as %g, the reference "
                    "scorer's value, which a threshold of %g or above (strict) drops; write each "
                    "point's probability, or score with a lower --threshold", path,
                    no_probability[0], DEFAULT_PROBABILITY, DEFAULT_PROBABILITY)
  if other_names:
    logging.warning("%s: left out %d point(s) not named %r: %s", path,
                    sum(other_names.values()), MITOTIC_FIGURE,
                    ", ".join(f"{k!r} ({v})" for k, v in sorted(other_names.items())))
  if unknown:
    logging.warning("%s: left out predictions for %d image(s) not in the annotations: %s",
                    path, len(unknown), ", ".join(unknown[:5]))
  return out


def write_predictions(
    path: str | os.PathLike[str],
    detections: Mapping[str, tuple[np.ndarray, np.ndarray]],
    um_per_px_by_file: Mapping[str, float],
) -> None:
  """Writes {file name: (xy_px [D, 2], scores [D])} as a MIDOG prediction file."""
  out = {}
  for name, (xy, scores) in detections.items():
    if name not in um_per_px_by_file:
      raise PredictionError(f"{os.fspath(path)}: no µm/px given for {name!r}")
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    scores = np.asarray(scores, np.float64).reshape(-1)
    if len(xy) != len(scores):
      raise PredictionError(
          f"{os.fspath(path)}, {name!r}: {len(xy)} points but {len(scores)} scores")
    mm = px_to_mm(xy, um_per_px_by_file[name])
    out[name] = {"points": [
        {"name": MITOTIC_FIGURE, "point": [float(x), float(y), 0],
         "probability": float(s)} for (x, y), s in zip(mm, scores)]}
  atomic.write_json(path, out, indent=None)


def write_geojson(path: str | os.PathLike[str], xy_px: np.ndarray, scores: np.ndarray,
                  name: str = "Mitotic figure") -> None:
  """Detections of one image as GeoJSON points in pixels, as QuPath imports
  them (File > Import objects): one annotation per point, its score as a
  measurement."""
  features = [{
      "type": "Feature",
      "geometry": {"type": "Point", "coordinates": [float(x), float(y)]},
      "properties": {"objectType": "annotation",
                     "classification": {"name": name, "color": [220, 20, 60]},
                     "measurements": {"probability": float(p)}},
  } for (x, y), p in zip(np.asarray(xy_px).reshape(-1, 2), np.asarray(scores).reshape(-1))]
  atomic.write_json(path, {"type": "FeatureCollection", "features": features}, indent=None)
