"""The demo's experiment trained on all five folds: the folds alone against their ensemble.

    python benchmarks/fold_ensemble.py [--workdir /tmp/midog_fold_ensemble] [--folds 0,1,2,3,4]
                                       [--record]

The synthetic MIDOG++ of `configs/demo.py`, five training runs (one per
validation fold, `python -m midog_jax.train`), then `python -m midog_jax.eval
--runs`, which scores each fold on the test split and the five as one
ensemble (fused detections, at the mean of their thresholds). Prints the
per-fold test F1 and AP, their mean ± std and the ensemble's. Everything is
resumed where it stopped: a rerun trains only the folds not finished.
`--record` writes benchmarks/results/fold_ensemble.json, which README.md
quotes (benchmarks/figures.py). The ensemble's cost per window is
benchmarks/ensemble.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import demo  # noqa: E402
from midog_jax.evaluation import end_to_end  # noqa: E402


def _train(data_dir: str, fold: int, workdir: str) -> float:
  """Trains (or resumes, or finds finished) one fold; its wall seconds now."""
  start = time.perf_counter()
  subprocess.run([sys.executable, "-m", "midog_jax.train", "--config", "configs/demo.py",
                  f"--config.fold={fold}", f"--config.data_dir={data_dir}",
                  "--workdir", workdir], check=True, cwd=ROOT)
  return time.perf_counter() - start


def _stats(values) -> dict:
  return {"values": values, "mean": float(np.mean(values)), "std": float(np.std(values))}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="/tmp/midog_fold_ensemble")
  parser.add_argument("--folds", default="0,1,2,3,4")
  parser.add_argument("--record", action="store_true",
                      help="write benchmarks/results/fold_ensemble.json")
  args = parser.parse_args(argv)
  folds = [int(k) for k in args.folds.split(",")]
  workdir = os.path.abspath(args.workdir)
  config = demo.get_config()
  _, data_dir = end_to_end.synthetic_data(config, workdir)
  runs_root, report = os.path.join(workdir, "runs"), os.path.join(workdir, "report")
  seconds = {k: _train(data_dir, k, os.path.join(runs_root, config.experiment, f"fold{k}"))
             for k in folds}
  subprocess.run([sys.executable, "-m", "midog_jax.eval", "--runs", runs_root, "--out", report,
                  "--folds", args.folds], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
  runs = json.loads(pathlib.Path(report, "runs.json").read_text())
  [ensemble] = json.loads(pathlib.Path(report, "ensembles.json").read_text())
  by_fold = sorted(runs, key=lambda r: r["fold"])
  result = {
      "experiment": config.experiment, "folds": folds,
      "test_cases": len(ensemble["test"]["cases"]),
      "test_figures": ensemble["test"]["overall"]["tp"] + ensemble["test"]["overall"]["fn"],
      "f1": _stats([r["test"]["overall"]["f1"] for r in by_fold]),
      "ap": _stats([r["test"]["overall"]["ap"] for r in by_fold]),
      "thresholds": [r["threshold"] for r in by_fold],
      "ensemble": {"f1": ensemble["test"]["overall"]["f1"], "ap": ensemble["test"]["overall"]["ap"],
                   "threshold": ensemble["threshold"]},
      # Each run's own training time (its summary), and what this invocation took per fold.
      "train_seconds": {str(r["fold"]): round(json.loads(pathlib.Path(
          runs_root, r["workdir"], "summary.json").read_text())["train_seconds"], 1)
          for r in by_fold},
      "train_seconds_now": {str(k): round(v, 1) for k, v in seconds.items()},
      # The matrices' row of the experiment: the folds' mean ± std and "ens." in each cell.
      "report_f1_row": next(
          line.strip() for line in pathlib.Path(report, "domain_matrices.md").read_text(
              encoding="utf-8").splitlines() if line.startswith("| all tumour types")),
  }
  for r in by_fold:
    o = r["test"]["overall"]
    print(f"fold {r['fold']}: test F1 {o['f1']:.3f}, AP {o['ap']:.3f} (threshold "
          f"{r['threshold']:.2f})")
  print(f"folds: F1 {result['f1']['mean']:.3f} ± {result['f1']['std']:.3f}, AP "
        f"{result['ap']['mean']:.3f} ± {result['ap']['std']:.3f}")
  e = result["ensemble"]
  print(f"ensemble of {len(folds)}: F1 {e['f1']:.3f}, AP {e['ap']:.3f} (threshold "
        f"{e['threshold']:.2f}); {result['test_cases']} test cases; report {report}")
  if args.record:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import figures  # A script beside this one.
    record = {"machine": figures.machine(), "date": time.strftime("%Y-%m-%d"),
              "command": "python benchmarks/fold_ensemble.py --record", **result}
    figures.RESULTS.mkdir(parents=True, exist_ok=True)
    (figures.RESULTS / "fold_ensemble.json").write_text(json.dumps(record, indent=1) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
