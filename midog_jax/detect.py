"""Sliding-window detection of mitotic figures with a trained run.

  python -m midog_jax.detect --workdir W | --checkpoint C \\
      (--images a.tiff b.tiff ... | --split test) --out predictions.json \\
      [--geojson DIR] [--overlay DIR] [--threshold T] [--min-score S] [--data-dir D]

Writes the MIDOG challenge JSON (positions in mm from each image's µm/px),
one QuPath GeoJSON per image on request, and overlay PNGs to check by eye.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

from midog_jax import cli

if TYPE_CHECKING:
  import ml_collections
  import numpy as np

  from midog_jax import normalization as normalization_lib

# JAX, Orbax, the model and the image readers are imported in the functions
# that use them: `--help` and argument errors then answer at once.

DEFAULT_OPERATING_POINT = 0.5  # The reference's `detect_thresh`.


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
    checkpoint = os.path.abspath(checkpoint.rstrip("/"))
    workdir = os.path.dirname(os.path.dirname(checkpoint))
    if not (os.path.basename(checkpoint).isdigit()
            and os.path.exists(os.path.join(workdir, "config.json"))):
      raise FileNotFoundError(
          f"{checkpoint}: expected WORKDIR/checkpoints/STEP with WORKDIR/config.json")
    return workdir, checkpoint
  from midog_jax import checkpoints
  workdir = os.path.abspath(workdir)
  if not os.path.exists(os.path.join(workdir, "config.json")):
    raise FileNotFoundError(f"{workdir}: not a training run (no config.json)")
  ckpt = checkpoints.RunCheckpoints(workdir, read_only=True)
  try:
    step = ckpt.best_step()
    step = ckpt.latest_step() if step is None else step
  finally:
    ckpt.close()
  if step is None:
    if ckpt.has_old_layout():
      raise FileNotFoundError(ckpt.old_layout_message())
    raise FileNotFoundError(f"{workdir}: no checkpoint in checkpoints/; "
                            "train first (python -m midog_jax.train ...)")
  return workdir, os.path.join(workdir, "checkpoints", str(step))


def load_run(workdir: str | None = None, checkpoint: str | None = None) -> LoadedRun:
  """Loads config, normalisation and weights of a run (best epoch by default)."""
  import jax
  import ml_collections
  import orbax.checkpoint as ocp
  from flax import nnx
  from midog_jax import model as model_lib
  from midog_jax import normalization as normalization_lib
  from midog_jax import optim, steps
  workdir, ckpt = _checkpoint_dir(workdir, checkpoint)
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    config = ml_collections.ConfigDict(json.load(f))
  norm = normalization_lib.Normalization.load(os.path.join(workdir, "normalization.json"))
  m = config.model
  model_config = model_lib.RetinaNetConfig(levels=tuple(m.levels), num_classes=m.num_classes,
                                           dtype=m.dtype)
  discriminative = config.optim.discriminative
  tx = optim.make_optimizer(1, discriminative=tuple(discriminative) if discriminative else None)
  graphdef, abstract = steps.abstract_train_state(
      lambda: model_lib.RetinaNet(model_config, rngs=nnx.Rngs(0)), tx,
      jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  restored = ocp.StandardCheckpointer().restore(os.path.join(ckpt, "state"), abstract)
  return LoadedRun(workdir, int(os.path.basename(ckpt)), config, norm, graphdef,
                   restored.params, restored.batch_stats)


class Detector:
  """Whole-image detection with a loaded run on every local device."""

  def __init__(self, run: LoadedRun, threshold: float | None = None, batch_size: int | None = None,
               progress: bool = False):
    import jax
    from midog_jax import inference, steps
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
    self.min_overlap = run.config.eval.get("window_min_overlap", inference.MIN_OVERLAP)

  def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from midog_jax import inference
    return inference.detect_image(image, self._fn, *self._weights, self.patch, self.batch_size,
                                  min_overlap=self.min_overlap, progress=self.progress)


def detect_all(detector: Detector, items: Iterable[tuple[str, np.ndarray]], total: int | None = None
               ) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
  """(name, image, xy, scores) per image, with progress over images (a bar on a
  terminal, a line every 30 s in a log file)."""
  for name, image in cli.progress(items, total, "detect", "image"):
    xy, scores = detector(image)
    yield name, image, xy, scores


def _image_items(paths: Sequence[tuple[str, str]], failed: dict[str, str]
                 ) -> Iterator[tuple[str, np.ndarray]]:
  """(name, image) of each readable (path, name); failures go to `failed`."""
  from midog_jax import roi_io
  for path, name in paths:
    try:
      image = roi_io.read_roi(path)
    except (roi_io.RoiError, OSError) as e:
      failed[name] = str(e)
      continue
    yield name, image


def split_cases(run: LoadedRun, data_dir: str | None, split: str) -> list:
  """A dataset split's cases; "valid" is the run's own validation fold."""
  from midog_jax import dataset, files  # TensorFlow only for reading the dataset.
  if split != "valid":
    return dataset.read_cases(data_dir, split)
  meta_path = os.path.join(run.workdir, "cases.json")
  names = files.read_json(meta_path)["valid"]
  if not names:
    raise ValueError(f"{meta_path}: the run has no validation cases")
  return dataset.select_cases(dataset.read_cases(data_dir, "train"), file_names=names)


def main(argv: Sequence[str] | None = None) -> int:
  cli.quiet_startup()
  parser = argparse.ArgumentParser(prog="python -m midog_jax.detect",
                                   description=__doc__.splitlines()[0])
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="a training run (its best checkpoint is used)")
  source.add_argument("--checkpoint", help="WORKDIR/checkpoints/STEP (default: the best)")
  images = parser.add_mutually_exclusive_group(required=True)
  images.add_argument("--images", nargs="+", help="TIFF files (RGB, RGBA or greyscale, 8 bit)")
  images.add_argument("--split", choices=("train", "valid", "test"),
                      help="a split of the midogpp dataset; valid: the run's own validation fold")
  parser.add_argument("--data-dir", default=None, help="TFDS data dir (default: the run's)")
  parser.add_argument("--out", required=True, help="MIDOG challenge JSON to write")
  parser.add_argument("--threshold", type=float, default=None,
                      help="operating point for the GeoJSON and overlays (default: the one "
                           "chosen on the run's validation fold by `eval --runs`)")
  parser.add_argument("--min-score", type=float, default=None,
                      help="detections kept in the MIDOG JSON, with their probabilities "
                           "(default: the run's eval.score_threshold, the reference's 0.5)")
  parser.add_argument("--um-per-px", type=float, default=None,
                      help="resolution of --images without resolution tags")
  parser.add_argument("--geojson", default=None, help="folder for one QuPath GeoJSON per image")
  parser.add_argument("--overlay", default=None, help="folder for one overlay PNG per image")
  parser.add_argument("--batch-size", type=int, default=None, help="windows per device call")
  parser.add_argument("-v", "--verbose", action="count", default=0,
                      help="errors with their traceback and more log lines (-vv: all)")
  args = parser.parse_args(argv)
  with cli.logging_to_stderr(args.verbose):
    return _detect(args)


def _detect(args: argparse.Namespace) -> int:
  from midog_jax import overlay, predictions, roi_io
  try:
    _prepare_outputs(args)
    run = load_run(args.workdir, args.checkpoint)
    if args.images:
      names = _unique_names(args.images)
      um, failed = {}, {}
      for path, name in zip(args.images, names):
        try:  # Unreadable images are reported, the others still detected.
          value = roi_io.read_um_per_px(path) or args.um_per_px
        except roi_io.RoiError as e:
          failed[name] = str(e)
          continue
        if value is None:
          raise roi_io.RoiError(f"{path}: no resolution tags; pass --um-per-px (e.g. 0.25)")
        um[name] = value
      paths = [(p, n) for p, n in zip(args.images, names) if n in um]
      items, total, truth = _image_items(paths, failed), len(paths), {}
    else:
      from midog_jax import dataset  # TensorFlow only for reading the dataset.
      data_dir = args.data_dir or run.config.data_dir
      cases = split_cases(run, data_dir, args.split)
      items = ((c.file_name, image) for c, image in dataset.iterate_rois(data_dir, cases))
      total, failed = len(cases), {}
      um = {c.file_name: c.um_per_px for c in cases}
      truth = {c.file_name: c.mitotic_figures for c in cases}
  except (FileNotFoundError, roi_io.RoiError, ValueError, OSError) as e:
    if args.verbose:
      raise
    print(f"error: {e}", file=sys.stderr)
    return 2
  # A bar over each image's windows only on a terminal; a log gets one line per 30 s.
  detector = Detector(run, args.min_score, args.batch_size, progress=cli.stderr_is_tty())
  operating, source = operating_point(run, args.threshold)
  print(f"operating point {operating:g} ({source}) for GeoJSON and overlays; the MIDOG JSON "
        f"keeps every detection above {detector.threshold:g} with its probability")
  found = {}
  for name, image, xy, scores in detect_all(detector, items, total):
    found[name] = (xy, scores)
    stem = os.path.splitext(name)[0]
    if args.geojson:
      above = scores > operating
      predictions.write_geojson(os.path.join(args.geojson, f"{stem}.geojson"), xy[above],
                                scores[above])
    if args.overlay:
      overlay.write_overlay(os.path.join(args.overlay, f"{stem}.png"), image, xy,
                            truth.get(name), um[name], title=name, scores=scores,
                            threshold=operating)
  predictions.write_predictions(args.out, found, um)
  n = sum(len(s) for _, s in found.values())
  print(f"{n} detections in {len(found)} images (score > {detector.threshold:g}) -> {args.out}")
  for name, why in failed.items():
    print(f"error: {why}", file=sys.stderr)
  if failed:
    print(f"{len(failed)} image(s) failed; the other {len(found)} were written.", file=sys.stderr)
    return 1
  return 0


def operating_point(run: LoadedRun, threshold: float | None) -> tuple[float, str]:
  """(threshold, where it came from): given, else chosen on the validation fold."""
  from midog_jax import files
  if threshold is not None:
    return threshold, "--threshold"
  path = os.path.join(run.workdir, "evaluation.json")
  if os.path.exists(path):
    evaluation = files.read_json(path)
    if evaluation.get("checkpoint_step") == run.step and evaluation.get("threshold") is not None:
      return float(evaluation["threshold"]), "chosen on the validation fold, evaluation.json"
  return DEFAULT_OPERATING_POINT, ("the reference's detection threshold; run `python -m "
                                   "midog_jax.eval --runs` to choose one on the validation fold")


def _prepare_outputs(args) -> None:
  """Creates the output folders before any work, so no result is lost at the end."""
  out_dir = os.path.dirname(os.path.abspath(args.out))
  if os.path.isdir(args.out):
    raise ValueError(f"--out {args.out} is a folder; give a file name, e.g. {args.out}/predictions.json")
  for folder in (out_dir, args.geojson, args.overlay):
    if folder:
      os.makedirs(folder, exist_ok=True)
      if not os.access(folder, os.W_OK):
        raise PermissionError(f"{folder}: not writable")


def _unique_names(paths: Sequence[str]) -> list[str]:
  """Output names (file names); two inputs with one name are refused."""
  names = [os.path.basename(p) for p in paths]
  seen: dict[str, str] = {}
  for p, n in zip(paths, names):
    if n in seen:
      raise ValueError(f"{seen[n]} and {p} have the same file name {n}; outputs are keyed by "
                       "file name, so rename or copy one of them")
    seen[n] = p
  return names


if __name__ == "__main__":
  sys.exit(main())
