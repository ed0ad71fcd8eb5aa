"""Whole slides to mitotic counts with a trained run (or an ensemble of several).

  python -m midog_jax.slides --model RUN [--model RUN2 ...] --slides a.svs b.ndpi ... --out DIR \\
      [--threshold T] [--roi x,y,w,h | --roi ANNOTATION.geojson] [--um-per-px U] \\
      [--hotspot-mm2 2.37] [--hotspot-aspect 4:3]

Per slide, OUT/<stem>/: detections.json (MIDOG, mm), detections.geojson and
hotspot.geojson (QuPath), detections.csv, report.json, picture.png; for the
batch, OUT/summary.csv. A finished slide is never computed again; an
interrupted one resumes from its last saved band of windows (how:
midog_jax/detection/slides.py). `detect` remains the command for ROIs.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from midog_jax import commands
from midog_jax import console


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m midog_jax.slides",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--model", required=True, metavar="MODEL", action="append",
                      help="a training run's workdir (its best checkpoint), a bundle folder or "
                           "hf://OWNER/NAME[@REVISION]; repeat it (or give a bundle of several) "
                           "for an ensemble")
  parser.add_argument("--slides", nargs="+", required=True,
                      help="whole-slide images (any format OpenSlide reads) or TIFF ROIs")
  parser.add_argument("--out", required=True, help="output folder (one sub-folder per slide)")
  parser.add_argument("--threshold", type=commands.probability, default=None,
                      help="operating point: figures scored above it are counted (default: "
                           "the one chosen on the run's validation fold by `eval --runs`)")
  parser.add_argument("--min-score", type=commands.probability, default=None,
                      help="detections kept in detections.json (default: the run's "
                           "eval.score_threshold; never above the operating point)")
  parser.add_argument("--roi", default=None, metavar="x,y,w,h|FILE",
                      help="analyse only this region: level-0 px, or a QuPath GeoJSON export "
                           "of polygon annotations (applies to every slide)")
  parser.add_argument("--um-per-px", type=float, default=None,
                      help="resolution of slides that do not say theirs")
  parser.add_argument("--hotspot-mm2", type=float, default=2.37,
                      help="hotspot area in mm² (default 2.37: ten high-power fields)")
  parser.add_argument("--hotspot-aspect", type=commands.ratio, default="4:3",
                      help="hotspot width:height, e.g. 4:3 (default) or 1")
  parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                      help="threads reading windows (default: the cores, at most 8)")
  parser.add_argument("--batch-size", type=int, default=None, help="windows per device call")
  parser.add_argument("--band-windows", type=int, default=512,
                      help="windows per saved band: what an interruption can lose (default 512)")
  parser.add_argument("-v", "--verbose", action="count", default=0,
                      help="errors with their traceback and more log lines")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  console.quiet_startup()
  parser = build_parser()
  args = parser.parse_args(argv)
  if not (args.hotspot_mm2 > 0 and args.workers > 0 and args.band_windows > 0):
    parser.error("--hotspot-mm2, --workers and --band-windows must be positive")
  stems = {}
  for path in args.slides:
    stem = os.path.splitext(os.path.basename(path))[0]
    if stem in stems:
      parser.error(f"{stems[stem]} and {path} would share the output folder {stem}/; "
                   "rename one of them")
    stems[stem] = path
  with console.logging_to_stderr(args.verbose):
    return _slides(args)


def _slides(args: argparse.Namespace) -> int:
  # JAX, Orbax and OpenSlide after parsing: `--help` answers at once.
  from midog_jax.data import slide_reader
  from midog_jax.detection import models
  from midog_jax.detection import slide_outputs
  from midog_jax.detection import slides as slides_lib
  try:
    roi, polygons = slide_reader.parse_roi(args.roi)
    os.makedirs(args.out, exist_ok=True)
    runs = [r for spec in args.model for r in models.load(spec)]
    operating, source = models.operating_point(runs, args.threshold)
    min_score = runs[0].config.eval.score_threshold if args.min_score is None else args.min_score
    model = slides_lib.model_from_runs(runs, min(min_score, operating), args.batch_size)
  except (FileNotFoundError, ValueError, OSError) as e:  # BundleError is a ValueError.
    if args.verbose:
      raise
    print(f"error: {e}", file=sys.stderr)
    return 2
  settings = slides_lib.Settings(operating, source, args.um_per_px, roi, polygons,
                                 args.hotspot_mm2, args.hotspot_aspect, args.band_windows,
                                 args.workers)
  print(f"operating point {operating:g} ({source}); detections.json keeps scores above "
        f"{model.min_score:g}")
  failed = 0
  try:
    with console.sigterm_as_interrupt():  # A scheduler's stop ends as Ctrl-C does.
      for _, report, error in slides_lib.run_batch(args.slides, model, settings, args.out):
        failed += bool(error)
        print(f"error: {error}" if error else slide_outputs.describe(report),
              file=sys.stderr if error else sys.stdout)
  except KeyboardInterrupt:
    print("interrupted: the finished slides and bands are saved; run the same command again "
          "to resume", file=sys.stderr)
    return 130
  print(f"{len(args.slides) - failed} slide(s) -> {os.path.join(args.out, 'summary.csv')}")
  if failed:
    print(f"{failed} slide(s) failed; the others were written.", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(commands.guard(main))
