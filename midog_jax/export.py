"""Exports trained runs as a bundle to share: weights, configuration, model card.

  python -m midog_jax.export --workdir W [--checkpoint STEP] --out DIR
  python -m midog_jax.export --runs runs/<experiment> --out DIR   # its folds: an ensemble

The bundle (midog_jax/detection/bundle.py) loads with `detect --model DIR`
without TensorFlow, Orbax or the dataset. Publish it with the Hub's own
command: `hf upload OWNER/NAME DIR`; then `detect --model hf://OWNER/NAME@REVISION`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from midog_jax import commands
from midog_jax import console


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m midog_jax.export",
                                   description=__doc__.splitlines()[0])
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="one training run (its best checkpoint by default)")
  source.add_argument("--runs", metavar="EXPERIMENT_DIR",
                      help="an experiment's folder: every finished run in it (e.g. its five "
                           "folds) becomes a member of one bundle")
  parser.add_argument("--checkpoint", help="STEP of --workdir (default: the best)")
  parser.add_argument("--out", required=True, help="bundle folder to write (replaced if it is one)")
  parser.add_argument("--license", default="other",
                      help="licence identifier for the model card (default: other)")
  parser.add_argument("-v", "--verbose", action="count", default=0,
                      help="errors with their traceback and more log lines (-vv: all)")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  console.quiet_startup()
  args = build_parser().parse_args(argv)
  with console.logging_to_stderr(args.verbose):
    from midog_jax.detection import bundle
    from midog_jax.detection import models
    from midog_jax.evaluation import runs
    try:
      workdirs = [args.workdir] if args.workdir else list(runs.finished_runs(args.runs))
      if not workdirs:
        raise FileNotFoundError(f"{args.runs}: no finished run in it")
      if args.checkpoint and not args.workdir:
        raise ValueError("--checkpoint names a step of one run: use it with --workdir")
      checkpoint = (os.path.join(args.workdir, "checkpoints", args.checkpoint)
                    if args.checkpoint and args.checkpoint.isdigit() else args.checkpoint)
      out = models.export_runs(workdirs, args.out, checkpoint, args.license)
    except (FileNotFoundError, ValueError, OSError, bundle.BundleError) as e:
      if args.verbose:
        raise
      print(f"error: {e}", file=sys.stderr)
      return 2
  print(f"exported {len(workdirs)} run(s) -> {out} (publish: hf upload OWNER/NAME {out})")
  return 0


if __name__ == "__main__":
  sys.exit(commands.guard(main))
