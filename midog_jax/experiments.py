"""Command line for the paper's experiments.

  python -m midog_jax.experiments folds --annotations MIDOG++.json \
      --splits datasets_xvalidation.csv --tumor-types all --json
  python -m midog_jax.experiments run --plan paper --workdir W \
      --data-dir D [--folds 0,1,2,3,4] [--hardware gpu] [--set num_epochs=200]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from midog_jax import annotations as ann_lib
from midog_jax import domains
from midog_jax import folds as folds_lib

PLANS = ("single_domain", "leave_one_out", "all", "paper")
# gpu/tpu keep the paper's protocol (batch 12, bf16); *_large_batch do not.
HARDWARE = ("cpu", "gpu", "tpu", "gpu_large_batch", "tpu_large_batch")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def plan_experiments(plan: str) -> list[tuple[str, str]]:
  """(run name, experiment spec for configs.default.experiment_config)."""
  single = [(f"single_{t}", f"single_domain={t}") for t in domains.TUMOR_SLUGS]
  loo = [(f"without_{t}", f"leave_one_out={t}") for t in domains.TUMOR_SLUGS]
  everything = [("all_domains", "all_domains")]
  return {"single_domain": single, "leave_one_out": loo, "all": everything,
          "paper": single + loo + everything}[plan]


def config_arg(spec: str, hardware: str) -> str:
  """The --config value of one experiment on the chosen hardware."""
  configs = os.path.join(_ROOT, "configs")
  if hardware != "cpu":
    return f"{configs}/{hardware}.py:{spec}"
  kind, _, tumor = spec.partition("=")
  return f"{configs}/{kind}.py" + (f":{tumor}" if tumor else "")


def run_status(workdir: str) -> str:
  """'done', 'started' (has checkpoints, not finished) or 'left'."""
  summary = os.path.join(workdir, "summary.json")
  if os.path.exists(summary):
    with open(summary, encoding="utf-8") as f:
      if json.load(f).get("status") == "finished":
        return "done"
  return "started" if os.path.isdir(os.path.join(workdir, "checkpoints")) else "left"


def _table(runs, states, durations) -> str:
  done = sum(s == "done" for s in states.values())
  left = len(runs) - done
  eta = (f", about {sum(durations) / len(durations) * left / 3600:.1f} h left"
         if durations and left else "")
  lines = [f"{done}/{len(runs)} runs done{eta}"]
  lines += [f"  {states[r]:8s} {r}" for r in runs]
  return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
  folds = [int(f) for f in args.folds.split(",")]
  runs = {}
  for name, spec in plan_experiments(args.plan):
    for k in folds:
      runs[f"{name}/fold{k}"] = spec
  durations = []
  for run, spec in runs.items():
    states = {r: run_status(os.path.join(args.workdir, r)) for r in runs}
    if states[run] == "done":
      continue
    states[run] = "running"
    print(_table(list(runs), states, durations), flush=True)
    workdir = os.path.join(args.workdir, run)
    cmd = [sys.executable, "-m", "midog_jax.train", "--config", config_arg(spec, args.hardware),
           "--workdir", workdir, f"--config.fold={run.rsplit('fold', 1)[1]}"]
    if args.data_dir:
      cmd.append(f"--config.data_dir={args.data_dir}")
    cmd += [f"--config.{kv}" for kv in args.set]
    start = time.time()
    proc = subprocess.Popen(cmd)
    try:
      code = proc.wait()
    except KeyboardInterrupt:  # The run saves its checkpoint on SIGINT too.
      proc.send_signal(signal.SIGINT)
      proc.wait()
      print("interrupted; run the same command again to resume", file=sys.stderr)
      return 130
    if code != 0 or run_status(workdir) != "done":
      print(f"error: {run} stopped (exit code {code}); see {workdir}", file=sys.stderr)
      return code or 1
    durations.append(time.time() - start)
  print(_table(list(runs), {r: run_status(os.path.join(args.workdir, r)) for r in runs},
               durations))
  return 0


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

  r = sub.add_parser("run", help="train every (experiment, fold) of a plan not yet done")
  r.add_argument("--plan", required=True, choices=PLANS)
  r.add_argument("--workdir", required=True, help="runs go to WORKDIR/<experiment>/fold<k>")
  r.add_argument("--data-dir", default=None, help="TFDS data dir holding midogpp")
  r.add_argument("--folds", default="0,1,2,3,4", help="comma-separated folds")
  r.add_argument("--hardware", default="cpu", choices=HARDWARE,
                 help="configs/default.py settings (cpu) or the gpu/tpu variants")
  r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override for every run, e.g. num_epochs=200")
  r.set_defaults(func=_run)
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
