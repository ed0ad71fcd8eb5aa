"""Command line for the paper's experiments.

  python -m midog_jax.experiments folds --annotations MIDOG++.json \
      --splits datasets_xvalidation.csv --tumor-types all --json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from midog_jax import annotations as ann_lib
from midog_jax import folds as folds_lib


def _folds(args: argparse.Namespace) -> int:
  cases = ann_lib.load_cases(args.annotations, args.splits)
  splits = folds_lib.folds(cases, args.tumor_types)
  if args.json:
    print(json.dumps([{"train": t, "valid": v} for t, v in splits], indent=1))
  else:
    for k, (train, valid) in enumerate(splits):
      print(f"fold {k}: {len(train)} train, {len(valid)} valid: "
            f"{' '.join(valid)}")
  return 0


def build_parser() -> argparse.ArgumentParser:
  """The parser; each subcommand sets `func(args) -> exit code`."""
  parser = argparse.ArgumentParser(prog="python -m midog_jax.experiments",
                                   description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("folds", help="print an experiment's 5 folds")
  p.add_argument("--annotations", required=True, help="path of MIDOG++.json")
  p.add_argument("--splits", required=True,
                 help="path of datasets_xvalidation.csv")
  p.add_argument("--tumor-types", default="all",
                 help="'all' or comma-separated tumour types, any spelling")
  p.add_argument("--json", action="store_true",
                 help='print [{"train": [...], "valid": [...]}, ...]')
  p.set_defaults(func=_folds)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return args.func(args)
  except (ann_lib.AnnotationError, KeyError, ValueError) as e:
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
