"""What `detect` writes: the table of output formats, one command-line option each.

A format writes either one file per image into a folder (`write_image`) or
one file for all images at the end (`write_all`). `detect` adds an option
per entry and writes every format whose option was given. To add a format,
write its function and add an `OutputFormat` to `OUTPUT_FORMATS`; see
README.md, "Where to add an output format".
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping

import numpy as np

from midog_jax.detection import predictions


@dataclasses.dataclass(frozen=True)
class Detected:
  """One image's detections, with what a writer may need."""
  name: str  # File name, the key of the MIDOG JSON.
  image: np.ndarray  # uint8 [H, W, 3].
  xy: np.ndarray  # [D, 2] pixels, every detection above the kept minimum score.
  scores: np.ndarray  # [D].
  um_per_px: float
  operating_point: float  # Detections scored above it are the figures counted.
  truth: Any = None  # Ground-truth points, where known.

  @property
  def stem(self) -> str:
    return os.path.splitext(self.name)[0]


@dataclasses.dataclass(frozen=True)
class OutputFormat:
  """One output: its option on detect's command line and how it is written."""
  option: str  # E.g. "--geojson".
  metavar: str  # "DIR" for one file per image, "FILE" for one file.
  help: str
  write_image: Callable[[str, Detected], None] | None = None  # (folder, detected).
  # (path, {name: (xy, scores)}, {name: µm/px}).
  write_all: Callable[[str, Mapping[str, tuple[np.ndarray, np.ndarray]], Mapping[str, float]],
                      None] | None = None
  required: bool = False
  thresholded: bool = False  # Shows only the detections above the operating point.


def _geojson(folder: str, d: Detected) -> None:
  above = d.scores > d.operating_point
  predictions.write_geojson(os.path.join(folder, f"{d.stem}.geojson"), d.xy[above],
                            d.scores[above])


def _overlay(folder: str, d: Detected) -> None:
  # Matplotlib only when overlays are asked for. Overlays colour hits and
  # misses as the scorer matches them: detection's one use of evaluation.
  from midog_jax.evaluation import overlay
  overlay.write_overlay(os.path.join(folder, f"{d.stem}.png"), d.image, d.xy, d.truth,
                        d.um_per_px, title=d.name, scores=d.scores, threshold=d.operating_point)


OUTPUT_FORMATS: dict[str, OutputFormat] = {
    "midog_json": OutputFormat(
        "--out", "FILE", "MIDOG challenge JSON to write (every detection with its probability)",
        write_all=predictions.write_predictions, required=True),
    "geojson": OutputFormat(
        "--geojson", "DIR", "folder for one QuPath GeoJSON per image (detections above the "
        "operating point, the probability as a measurement)", write_image=_geojson,
        thresholded=True),
    "overlay": OutputFormat(
        "--overlay", "DIR", "folder for one overlay PNG per image (detections above the "
        "operating point: green hits, red false positives, cyan missed figures where the "
        "ground truth is known, yellow where it is not)", write_image=_overlay,
        thresholded=True),
}


def prepare(targets: Mapping[str, str]) -> None:
  """Creates output folders before any work ({format name: path}), so no result is lost."""
  for name, path in targets.items():
    fmt = OUTPUT_FORMATS[name]
    if fmt.write_all is not None and os.path.isdir(path):
      raise ValueError(f"{fmt.option} {path} is a folder; give a file name, e.g. "
                       f"{path}/predictions.json")
    folder = path if fmt.write_image is not None else os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if not os.access(folder, os.W_OK):
      raise PermissionError(f"{folder}: not writable")


def write_image(targets: Mapping[str, str], detected: Detected) -> None:
  """Writes `detected` in every per-image format of `targets`."""
  for name, path in targets.items():
    if OUTPUT_FORMATS[name].write_image is not None:
      OUTPUT_FORMATS[name].write_image(path, detected)


def write_all(targets: Mapping[str, str], found: Mapping[str, tuple[np.ndarray, np.ndarray]],
              um_per_px: Mapping[str, float]) -> None:
  """Writes every whole-batch format of `targets`."""
  for name, path in targets.items():
    if OUTPUT_FORMATS[name].write_all is not None:
      OUTPUT_FORMATS[name].write_all(path, found, um_per_px)
