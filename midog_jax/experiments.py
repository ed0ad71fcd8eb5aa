"""Command line for the paper's experiments.

  python -m midog_jax.experiments folds --annotations MIDOG++.json \
      --splits datasets_xvalidation.csv --tumor-types all --json
  python -m midog_jax.experiments run --plan paper --workdir W \
      --data-dir D [--folds 0,1,2,3,4] [--hardware gpu] [--set num_epochs=200] \
      [--group 5] [--parallel 4] [--shard 0/3]

`run` trains every run of the plan (or of its `--shard`) that is neither
finished nor running, `--parallel` at once, each a subprocess pinned to one
device; `--group K` trains K runs in each subprocess, together in one
program; several launchers never train a run twice (midog_jax/training/launcher.py).
Only light modules are imported up front, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from midog_jax.data import annotations
from midog_jax.training import launcher


def _run(args: argparse.Namespace) -> int:
  launch = launcher.Launch(args.workdir, args.data_dir, args.hardware, tuple(args.set),
                           args.parallel, args.group)
  return launcher.run_plan(launch, args.plan, [int(f) for f in args.folds.split(",")],
                           args.shard)


def _folds(args: argparse.Namespace) -> int:
  from midog_jax.data import folds as folds_lib  # pandas and scikit-learn: slow to import.
  cases = annotations.load_cases(args.annotations, args.splits)
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

  r = sub.add_parser("run", help="train every (experiment, fold) of a plan not yet done")
  r.add_argument("--plan", required=True, choices=launcher.PLANS,
                 help="the runs: one tumour type each (single_domain), all but one "
                 "(leave_one_out), all types (all), or the 15 experiments of the paper")
  r.add_argument("--workdir", required=True, help="runs go to WORKDIR/<experiment>/fold<k>")
  r.add_argument("--data-dir", default=None, help="TFDS data dir holding midogpp")
  r.add_argument("--folds", default="0,1,2,3,4", help="comma-separated folds")
  r.add_argument("--hardware", default="cpu", choices=launcher.HARDWARE,
                 help="configs/default.py settings (cpu) or the gpu/tpu variants")
  r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override for every run, e.g. num_epochs=200")
  r.add_argument("--parallel", type=int, default=1, metavar="N",
                 help="processes trained at once, each on one device (GPU, TPU chip; on the "
                 "CPU, N processes)")
  r.add_argument("--group", type=int, default=1, metavar="K",
                 help="runs per process, trained together in one program (a run group, in "
                 "plan order): fills a large accelerator at the paper's batch; 1 on a CPU")
  r.add_argument("--shard", default=None, metavar="I/N",
                 help="train only the I-th (from 0) of N disjoint parts of the plan, e.g. "
                 "${SLURM_ARRAY_TASK_ID}/${SLURM_ARRAY_TASK_COUNT}")
  r.set_defaults(func=_run)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return args.func(args)
  except (annotations.AnnotationError, KeyError, ValueError) as e:
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
