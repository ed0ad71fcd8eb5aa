"""Sliding-window detection of mitotic figures with a trained run.

  python -m midog_jax.detect --workdir W | --checkpoint C \\
      (--images a.tiff b.tiff ... | --split test) --out predictions.json \\
      [--geojson DIR] [--overlay DIR] [--threshold T] [--data-dir D]

Writes the MIDOG challenge JSON (positions in mm from each image's µm/px),
one QuPath GeoJSON per image on request, and overlay PNGs to check by eye.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Iterable, Iterator, Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm

from midog_jax import inference
from midog_jax import model as model_lib
from midog_jax import normalization as normalization_lib
from midog_jax import optim
from midog_jax import overlay
from midog_jax import predictions
from midog_jax import roi_io
from midog_jax import steps


@dataclasses.dataclass
class LoadedRun:
  """A trained network with what detection needs from its run."""
  workdir: str
  step: int
  config: ml_collections.ConfigDict
  normalization: normalization_lib.Normalization
  graphdef: Any
  params: Any
  batch_stats: Any


def _checkpoint_dir(workdir: str | None, checkpoint: str | None) -> tuple[str, str]:
  """(run workdir, checkpoint step directory): the best epoch by default."""
  if checkpoint:
    checkpoint = os.path.abspath(checkpoint)
    workdir = os.path.dirname(os.path.dirname(os.path.dirname(checkpoint)))
    if not os.path.exists(os.path.join(workdir, "config.json")):
      raise FileNotFoundError(
          f"{checkpoint}: expected WORKDIR/checkpoints/(best|latest)/STEP with "
          "WORKDIR/config.json beside it")
    return workdir, checkpoint
  for which in ("best", "latest"):
    root = os.path.join(workdir, "checkpoints", which)
    steps_ = sorted(int(p) for p in os.listdir(root) if p.isdigit()) if os.path.isdir(root) else []
    if steps_:
      return workdir, os.path.join(root, str(steps_[-1]))
  raise FileNotFoundError(f"{workdir}: no checkpoint in checkpoints/best or checkpoints/latest; "
                          "train first (python -m midog_jax.train ...)")


def load_run(workdir: str | None = None, checkpoint: str | None = None) -> LoadedRun:
  """Loads config, normalisation and weights of a run (best epoch by default)."""
  workdir, ckpt = _checkpoint_dir(workdir, checkpoint)
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    config = ml_collections.ConfigDict(json.load(f))
  norm = normalization_lib.Normalization.load(os.path.join(workdir, "normalization.json"))
  m = config.model
  model = model_lib.build_model(model_lib.RetinaNetConfig(
      levels=tuple(m.levels), num_classes=m.num_classes, dtype=m.dtype), seed=0)
  discriminative = config.optim.discriminative
  tx = optim.make_optimizer(1, discriminative=tuple(discriminative) if discriminative else None)
  graphdef, like = steps.init_train_state(model, tx)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  restored = ocp.StandardCheckpointer().restore(os.path.join(ckpt, "state"), abstract)
  return LoadedRun(workdir, int(os.path.basename(ckpt)), config, norm, graphdef,
                   restored.params, restored.batch_stats)


class Detector:
  """Whole-image detection with a loaded run on every local device."""

  def __init__(self, run: LoadedRun, threshold: float | None = None, batch_size: int | None = None,
               progress: bool = False):
    mesh = steps.make_mesh(jax.local_devices())
    per_device = max(1, (batch_size or run.config.eval.batch_size) // mesh.size)
    self.batch_size = per_device * mesh.size
    self.patch = run.config.patch_size
    self.threshold = run.config.eval.score_threshold if threshold is None else threshold
    self._fn = inference.make_detector(
        run.graphdef, run.normalization, self.patch, run.config.eval.max_detections_per_window,
        self.threshold, mesh=mesh)
    self._weights = steps.replicate((run.params, run.batch_stats), mesh)
    self.progress = progress  # A bar over each image's windows.

  def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return inference.detect_image(image, self._fn, *self._weights, self.patch, self.batch_size,
                                  progress=self.progress)


def detect_all(detector: Detector, items: Iterable[tuple[str, np.ndarray]], total: int | None = None
               ) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
  """(name, image, xy, scores) per image, with a progress bar over images."""
  for name, image in tqdm(items, total=total, desc="detect", unit="image"):
    xy, scores = detector(image)
    yield name, image, xy, scores


def _image_items(paths: Sequence[str]) -> Iterator[tuple[str, np.ndarray]]:
  for path in paths:
    yield os.path.basename(path), roi_io.read_roi(path)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m midog_jax.detect",
                                   description=__doc__.splitlines()[0])
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="a training run (its best checkpoint is used)")
  source.add_argument("--checkpoint", help="WORKDIR/checkpoints/(best|latest)/STEP")
  images = parser.add_mutually_exclusive_group(required=True)
  images.add_argument("--images", nargs="+", help="TIFF files (RGB, RGBA or greyscale, 8 bit)")
  images.add_argument("--split", choices=("train", "test"), help="a split of the midogpp dataset")
  parser.add_argument("--data-dir", default=None, help="TFDS data dir (default: the run's)")
  parser.add_argument("--out", required=True, help="MIDOG challenge JSON to write")
  parser.add_argument("--threshold", type=float, default=None,
                      help="keep detections scored above this (default: the run's eval threshold)")
  parser.add_argument("--um-per-px", type=float, default=None,
                      help="resolution of --images without resolution tags")
  parser.add_argument("--geojson", default=None, help="folder for one QuPath GeoJSON per image")
  parser.add_argument("--overlay", default=None, help="folder for one overlay PNG per image")
  parser.add_argument("--overlay-threshold", type=float, default=0.5,
                      help="operating point drawn in the overlays")
  parser.add_argument("--batch-size", type=int, default=None, help="windows per device call")
  args = parser.parse_args(argv)
  try:
    run = load_run(args.workdir, args.checkpoint)
    if args.images:
      items, total, truth = _image_items(args.images), len(args.images), {}
      um = {}
      for path in args.images:
        value = roi_io.read_um_per_px(path) or args.um_per_px
        if value is None:
          raise roi_io.RoiError(f"{path}: no resolution tags; pass --um-per-px (e.g. 0.25)")
        um[os.path.basename(path)] = value
    else:
      from midog_jax import dataset  # TensorFlow only for reading the dataset.
      data_dir = args.data_dir or run.config.data_dir
      cases = dataset.read_cases(data_dir, args.split)
      items = ((c.file_name, image) for c, image in dataset.iterate_rois(data_dir, cases))
      total = len(cases)
      um = {c.file_name: c.um_per_px for c in cases}
      truth = {c.file_name: c.mitotic_figures for c in cases}
  except (FileNotFoundError, roi_io.RoiError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for folder in (args.geojson, args.overlay):
    if folder:
      os.makedirs(folder, exist_ok=True)
  detector = Detector(run, args.threshold, args.batch_size, progress=True)
  found = {}
  try:
    for name, image, xy, scores in detect_all(detector, items, total):
      found[name] = (xy, scores)
      stem = os.path.splitext(name)[0]
      if args.geojson:
        predictions.write_geojson(os.path.join(args.geojson, f"{stem}.geojson"), xy, scores)
      if args.overlay:
        overlay.write_overlay(os.path.join(args.overlay, f"{stem}.png"), image, xy,
                              truth.get(name), um[name], title=name, scores=scores,
                              threshold=args.overlay_threshold)
  except roi_io.RoiError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  predictions.write_predictions(args.out, found, um)
  n = sum(len(s) for _, s in found.values())
  print(f"{n} detections in {len(found)} images -> {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
