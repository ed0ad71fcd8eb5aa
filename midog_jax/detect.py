"""Sliding-window detection of mitotic figures with a trained run.

  python -m midog_jax.detect --workdir W | --checkpoint C | --model M [--model M2 ...] \\
      (--images a.tiff b.tiff ... | --split test) --out predictions.json \\
      [--geojson DIR] [--overlay DIR] [--threshold T] [--min-score S] [--data-dir D]

Writes the MIDOG challenge JSON (positions in mm from each image's µm/px),
one QuPath GeoJSON per image on request, and overlay PNGs to check by eye
(the formats: midog_jax/detection/outputs.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from midog_jax import commands
from midog_jax import console

# The detector (JAX, Orbax, the model) is imported after parsing: `--help`
# and argument errors then answer at once.


def build_parser() -> argparse.ArgumentParser:
  from midog_jax.detection import outputs  # NumPy and Matplotlib only.
  parser = argparse.ArgumentParser(prog="python -m midog_jax.detect",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", help="a training run (its best checkpoint is used)")
  parser.add_argument("--checkpoint", help="WORKDIR/checkpoints/STEP, or STEP with --workdir "
                                           "(default: the best)")
  parser.add_argument("--model", action="append", default=[],
                      help="a run's workdir, a bundle folder or hf://OWNER/NAME[@REVISION]; "
                           "repeat it (or give a bundle of several) for an ensemble")
  images = parser.add_mutually_exclusive_group(required=True)
  images.add_argument("--images", nargs="+", help="TIFF files (RGB, RGBA or greyscale, 8 bit)")
  images.add_argument("--split", choices=("train", "valid", "test"),
                      help="a split of the midogpp dataset; valid: the run's own validation fold")
  parser.add_argument("--data-dir", default=None, help="TFDS data dir (default: the run's)")
  for name, fmt in outputs.OUTPUT_FORMATS.items():
    parser.add_argument(fmt.option, dest=name, metavar=fmt.metavar, required=fmt.required,
                        default=None, help=fmt.help)
  parser.add_argument("--threshold", type=commands.probability, default=None,
                      help="operating point for the GeoJSON and overlays (default: the one "
                           "chosen on the run's validation fold by `eval --runs`)")
  parser.add_argument("--min-score", type=commands.probability, default=None,
                      help="detections kept in the MIDOG JSON, with their probabilities "
                           "(default: the run's eval.score_threshold, the reference's 0.5)")
  parser.add_argument("--um-per-px", type=float, default=None,
                      help="resolution of --images without resolution tags")
  parser.add_argument("--batch-size", type=int, default=None, help="windows per device call")
  parser.add_argument("-v", "--verbose", action="count", default=0,
                      help="errors with their traceback and more log lines (-vv: all)")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  console.quiet_startup()
  parser = build_parser()
  args = parser.parse_args(argv)
  if bool(args.model) == bool(args.workdir or args.checkpoint):
    parser.error("one of --workdir, --checkpoint and --model is required")
  if args.workdir and args.checkpoint:  # One checkpoint of that run.
    steps = os.path.join(args.workdir, "checkpoints")
    if args.checkpoint.isdigit():
      args.checkpoint = os.path.join(steps, args.checkpoint)
    elif os.path.abspath(os.path.dirname(args.checkpoint.rstrip("/"))) != os.path.abspath(steps):
      parser.error(f"--checkpoint {args.checkpoint} is not a checkpoint of --workdir "
                   f"{args.workdir} (expected {steps}/STEP or a step number)")
  with console.logging_to_stderr(args.verbose):
    return _detect(args)


def _detect(args: argparse.Namespace) -> int:
  from midog_jax.data import roi_io
  from midog_jax.detection import bundle
  from midog_jax.detection import detector as detector_lib
  from midog_jax.detection import models
  from midog_jax.detection import outputs
  targets = {name: getattr(args, name) for name in outputs.OUTPUT_FORMATS
             if getattr(args, name)}
  try:
    outputs.prepare(targets)
    runs = ([r for spec in args.model for r in models.load(spec)] if args.model
            else [detector_lib.load_run(args.workdir, args.checkpoint)])
    images = (detector_lib.images_from_files(args.images, args.um_per_px) if args.images
              else detector_lib.split_images(runs[0], args.data_dir, args.split))
    # A bar over each image's windows only on a terminal; a log gets one line per 30 s.
    detector, operating, source = models.detector_for(
        runs, args.min_score, args.batch_size, args.threshold, progress=console.stderr_is_tty())
  except (FileNotFoundError, roi_io.RoiError, ValueError, OSError, bundle.BundleError) as e:
    if args.verbose:
      raise
    print(f"error: {e}", file=sys.stderr)
    return 2
  shown = [outputs.OUTPUT_FORMATS[n].option for n in targets if outputs.OUTPUT_FORMATS[n].thresholded]
  if shown:
    print(f"operating point {operating:g} ({source}) for {' and '.join(shown)}")
  if len(runs) > 1:  # A fused score is a mean over members: it can be below theirs.
    print(f"the MIDOG JSON keeps the fusion of the {len(runs)} members' detections above "
          f"{detector.threshold:g}, with its probability")
  else:
    print(f"the MIDOG JSON keeps every detection above {detector.threshold:g} with its "
          "probability")
  found = {}
  for name, image, xy, scores in detector_lib.detect_all(detector, images.items, images.total):
    found[name] = (xy, scores)
    outputs.write_image(targets, outputs.Detected(
        name, image, xy, scores, images.um_per_px[name], operating, images.truth.get(name)))
  outputs.write_all(targets, found, images.um_per_px)
  n = sum(len(s) for _, s in found.values())
  print(f"{n} detections in {len(found)} images (score > {detector.threshold:g}) -> "
        f"{args.midog_json}")
  for why in images.failed.values():
    print(f"error: {why}", file=sys.stderr)
  if images.failed:
    print(f"{len(images.failed)} image(s) failed; the other {len(found)} were written.",
          file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(commands.guard(main))
