"""MIDOG evaluation: score prediction files, or build the paper's domain matrices.

  python -m midog_jax.eval score --annotations MIDOG++.json \\
      --splits datasets_xvalidation.csv --predictions test.json \\
      [--split test|train] [--threshold T | --choose-threshold-on val.json] [--json]
  python -m midog_jax.eval --runs W --out REPORT [--compare-paper] [--data-dir D]

The metrics themselves live in `midog_jax.metrics`, the run evaluation in
`midog_jax.run_eval` and the matrices in `midog_jax.domain_matrix`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from typing import Sequence

import numpy as np

from midog_jax import annotations as annotations_lib
from midog_jax import cli
from midog_jax import metrics
from midog_jax import predictions as predictions_lib

DEFAULT_THRESHOLD = 0.5  # The reference scorer's default.


def scored_cases(cases: Sequence[annotations_lib.Case],
                 dets: dict[str, predictions_lib.Detections]) -> list[metrics.ScoredCase]:
  """Pairs cases with their detections (px); a case without any counts as empty."""
  missing = [c.file_name for c in cases if c.file_name not in dets]
  if missing:
    # The reference scorer skips such cases; counting them as empty is stricter.
    logging.warning("No predictions for %d case(s), scored as empty: %s",
                    len(missing), cli.first_of(missing))
  out = []
  for c in cases:
    d = dets.get(c.file_name, predictions_lib.Detections(np.zeros((0, 2)), np.zeros(0)))
    gt = np.asarray([(o.x, o.y) for o in c.mitotic_figures], np.float64).reshape(-1, 2)
    out.append(metrics.ScoredCase(gt, d.xy, d.scores, c.um_per_px))
  return out


def score(cases: Sequence[annotations_lib.Case],
          dets: dict[str, predictions_lib.Detections],
          threshold: float) -> dict:
  """The `score --json` report for `cases`."""
  return metrics.summarize(scored_cases(cases, dets), [c.tumor for c in cases],
                           threshold, [c.file_name for c in cases])


def _fmt(v: float) -> str:
  return "  n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def format_table(report: dict) -> str:
  """A readable table of the per-tumour and overall metrics."""
  rows = list(report["tumor_types"].items()) + [("overall", report["overall"])]
  width = max(len(name) for name, _ in rows)
  head = f"{'tumour type':<{width}}  {'TP':>6} {'FP':>6} {'FN':>6}  prec   rec    F1     AP"
  lines = [f"threshold {report['threshold']:.2f}", head, "-" * len(head)]
  for name, m in rows:
    lines.append(f"{name:<{width}}  {m['tp']:>6} {m['fp']:>6} {m['fn']:>6}  "
                 f"{_fmt(m['precision'])}  {_fmt(m['recall'])}  {_fmt(m['f1'])}  {_fmt(m['ap'])}")
  return "\n".join(lines)


def _run_score(args: argparse.Namespace) -> int:
  try:
    all_cases = annotations_lib.load_cases(args.annotations, args.splits)
    um = {c.file_name: c.um_per_px for c in all_cases}
    sizes = {c.file_name: (c.width, c.height) for c in all_cases}
    dets = predictions_lib.read_predictions(args.predictions, um, sizes)
    threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    if args.choose_threshold_on:
      val = predictions_lib.read_predictions(args.choose_threshold_on, um, sizes)
      val_cases = [c for c in all_cases if c.file_name in val]
      if not val_cases:
        raise predictions_lib.PredictionError(
            f"{args.choose_threshold_on}: no image of the annotations in it")
      threshold, _ = metrics.choose_threshold(scored_cases(val_cases, val))
  except (annotations_lib.AnnotationError, predictions_lib.PredictionError) as e:
    if args.verbose:
      raise
    print(f"error: {e}", file=sys.stderr)
    return 2
  cases = [c for c in all_cases if c.split == args.split]
  report = score(cases, dets, threshold)
  if args.json:
    print(json.dumps(metrics.json_safe(report), indent=1))
  else:
    print(format_table(report))
  return 0


def probability(text: str) -> float:
  """An argparse type: a number in [0, 1] (NaN refused)."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
  if not 0.0 <= value <= 1.0:  # Also false for NaN.
    raise argparse.ArgumentTypeError(f"{text} is not in [0, 1]")
  return value


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m midog_jax.eval", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("score", help="score a MIDOG-format prediction file")
  p.add_argument("--annotations", required=True, help="MIDOG++.json")
  p.add_argument("--splits", required=True, help="datasets_xvalidation.csv")
  p.add_argument("--predictions", required=True, help="prediction JSON to score")
  p.add_argument("--split", choices=annotations_lib.SPLITS, default="test",
                 help="cases to score (default: test)")
  t = p.add_mutually_exclusive_group()
  t.add_argument("--threshold", type=probability,
                 help=f"score threshold, strict (default {DEFAULT_THRESHOLD})")
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
      description="Evaluate every finished run under --runs on the test split (threshold "
                  "chosen on each run's validation fold) and write the single-domain and "
                  "leave-one-out matrices of F1 and AP (CSV, Markdown, PNG). For scoring a "
                  "prediction file: python -m midog_jax.eval score --help")
  parser.add_argument("--runs", required=True, help="folder holding the runs (experiment/foldK)")
  parser.add_argument("--out", required=True, help="report folder")
  parser.add_argument("--compare-paper", action="store_true",
                      help="put the paper's Tables 4-7 values beside each cell")
  parser.add_argument("--data-dir", default=None, help="TFDS data dir (default: the runs')")
  parser.add_argument("--folds", default="0,1,2,3,4", help="folds expected per experiment")
  parser.add_argument("-v", "--verbose", action="count", default=0,
                      help="errors with their traceback and more log lines (-vv: all)")
  return parser


def _run_runs(args: argparse.Namespace) -> int:
  from midog_jax import run_eval  # Imports JAX and TensorFlow; `score` needs neither.
  try:
    paths = run_eval.evaluate_all(args.runs, args.out, args.data_dir, args.compare_paper,
                                  tuple(int(f) for f in args.folds.split(",")))
  except (FileNotFoundError, ValueError, OSError) as e:
    if args.verbose:
      raise
    print(f"error: {e}", file=sys.stderr)
    return 2
  for p in paths:
    print(p)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  cli.quiet_startup()
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] in ("score", "-h", "--help") or not argv:
    args = build_parser().parse_args(argv)
    with cli.logging_to_stderr(args.verbose):
      return args.func(args)
  args = build_runs_parser().parse_args(argv)
  with cli.logging_to_stderr(args.verbose):
    return _run_runs(args)


if __name__ == "__main__":
  sys.exit(main())
