"""MIDOG evaluation: score prediction files, or build the paper's domain matrices.

  python -m midog_jax.eval score --annotations MIDOG++.json \\
      --splits datasets_xvalidation.csv --predictions test.json \\
      [--split test|train] [--threshold T | --choose-threshold-on val.json] [--json]
  python -m midog_jax.eval --runs W --out REPORT [--compare-paper] [--data-dir D]

The metrics live in `midog_jax/evaluation/metrics.py`; beside it `score.py`,
`runs.py`, `ensembles.py` and the matrices in `domain_matrix.py`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from midog_jax import commands
from midog_jax import console
from midog_jax.data import annotations
from midog_jax.detection import predictions
from midog_jax.evaluation import metrics
from midog_jax.evaluation import score


def _run_score(args: argparse.Namespace) -> int:
  try:
    report = score.score_file(args.annotations, args.splits, args.predictions, args.split,
                              args.threshold, args.choose_threshold_on)
  except (annotations.AnnotationError, predictions.PredictionError) as e:
    if args.verbose:
      raise
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(metrics.json_safe(report), indent=1) if args.json
        else score.format_table(report))
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m midog_jax.eval", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("score", help="score a MIDOG-format prediction file")
  p.add_argument("--annotations", required=True, help="MIDOG++.json")
  p.add_argument("--splits", required=True, help="datasets_xvalidation.csv")
  p.add_argument("--predictions", required=True, help="prediction JSON to score")
  p.add_argument("--split", choices=annotations.SPLITS, default="test",
                 help="cases to score (default: test)")
  t = p.add_mutually_exclusive_group()
  t.add_argument("--threshold", type=commands.probability,
                 help=f"score threshold, strict (default {score.DEFAULT_THRESHOLD})")
  t.add_argument("--choose-threshold-on", metavar="V",
                 help="prediction JSON of validation cases; the threshold with the "
                      "best pooled F1 on them (0.50 ... 0.99) is applied")
  p.add_argument("--json", action="store_true", help="print the report as JSON")
  p.add_argument("-v", "--verbose", action="count", default=0,
                 help="errors with their traceback and more log lines (-vv: all)")
  p.set_defaults(func=_run_score)
  return parser


def build_runs_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m midog_jax.eval",
      usage="python -m midog_jax.eval --runs RUNS --out REPORT [options]\n"
            "       python -m midog_jax.eval score --annotations A --splits S --predictions P "
            "[options]",
      description="MIDOG evaluation: the paper's domain matrices from trained runs, or the\n"
                  "score of one prediction file.\n\n"
                  "With --runs, every finished run under RUNS detects on its validation fold\n"
                  "and on the test split, takes the threshold with the best F1 on its\n"
                  "validation fold and is scored per test tumour type; the single-domain and\n"
                  "leave-one-out matrices of F1 and AP are written to REPORT (CSV, Markdown,\n"
                  "PNG heatmaps, runs.json), with each experiment's fold ensemble beside its\n"
                  "folds (\"ens.\"; ensembles.json, fused predictions in REPORT/ensembles/).",
      epilog="commands:\n  score   score one MIDOG-format prediction file "
             "(python -m midog_jax.eval score --help)",
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--runs", required=True, help="folder holding the runs (experiment/foldK)")
  parser.add_argument("--out", required=True, help="report folder")
  parser.add_argument("--compare-paper", action="store_true",
                      help="put the paper's Tables 4-7 values beside each cell")
  parser.add_argument("--data-dir", default=None, help="TFDS data dir (default: the runs')")
  parser.add_argument("--folds", default="0,1,2,3,4",
                      help="folds expected per experiment; a cell with fewer is marked "
                           "(default 0,1,2,3,4)")
  parser.add_argument("--checkpoint", choices=("best", "last"), default="best",
                      help="the epoch model selection kept (default, the paper's), or the last")
  parser.add_argument("-v", "--verbose", action="count", default=0,
                      help="errors with their traceback and more log lines (-vv: all)")
  return parser


def _run_runs(args: argparse.Namespace) -> int:
  from midog_jax.evaluation import runs  # JAX and TensorFlow; `score` needs neither.
  try:
    paths = runs.evaluate_all(args.runs, args.out, args.data_dir, args.compare_paper,
                              tuple(int(f) for f in args.folds.split(",")),
                              checkpoint=args.checkpoint)
  except (FileNotFoundError, ValueError, OSError) as e:
    if args.verbose:
      raise
    print(f"error: {e}", file=sys.stderr)
    return 2
  for p in paths:
    print(p)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  console.quiet_startup()
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] == "score":
    args = build_parser().parse_args(argv)
    with console.logging_to_stderr(args.verbose):
      return args.func(args)
  args = build_runs_parser().parse_args(argv)
  with console.logging_to_stderr(args.verbose):
    return _run_runs(args)


if __name__ == "__main__":
  sys.exit(commands.guard(main))
