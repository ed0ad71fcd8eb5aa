"""The whole path at the real size: write, build, train, evaluate full-size ROIs.

Writes N synthetic ROIs of 7215 x 5412 px in the real TIFF layout (striped,
uncompressed RGBA, about 156 MB each), builds `midogpp` from them with the
`tfds build` command (the splits shard as the real ones do), trains one
short epoch with `python -m midog_jax.train`, and runs `python -m
midog_jax.eval --runs` on the result. Each stage is its own process, so its
wall time and peak resident memory are its own; disk is measured per stage.
This is the template for the real build, and what small test images hide
(shard counts, memory per ROI, cache behaviour, time per stage) shows here.

  python benchmarks/scale.py --workdir /tmp/midog_scale [--cases-per-domain 3]
      [--patch 512] [--train-patches 48] [--cache-gb 2]

A stage whose output is already in --workdir is skipped (rerun to finish).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import machine  # benchmarks/machine.py, beside this script.

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _du(path: pathlib.Path) -> int:
  return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def _stage(name: str, argv: list[str], outputs: pathlib.Path, log: pathlib.Path) -> dict:
  """Runs one stage as a child process: wall seconds, peak RSS, disk written."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
  t = time.perf_counter()
  with open(log, "w", encoding="utf-8") as out:
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
  wall = time.perf_counter() - t
  code = os.waitstatus_to_exitcode(status)
  if code != 0:
    tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
    raise SystemExit(f"stage {name} failed with exit code {code}; its log {log} ends:\n{tail}")
  row = {"stage": name, "seconds": round(wall, 1), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2),
         "disk_gb": round(_du(outputs) / 2**30, 2)}
  print(json.dumps(row), flush=True)
  return row


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--cases-per-domain", type=int, default=3, help="10 domains: 30 ROIs")
  parser.add_argument("--width", type=int, default=7215)
  parser.add_argument("--height", type=int, default=5412)
  parser.add_argument("--patch", type=int, default=512)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--train-patches", type=int, default=48)
  parser.add_argument("--valid-patches", type=int, default=16)
  parser.add_argument("--cache-gb", type=float, default=2.0,
                      help="decoded-ROI cache of the trainer (a full-size ROI is 117 MB)")
  args = parser.parse_args(argv)
  work = pathlib.Path(args.workdir).resolve()
  work.mkdir(parents=True, exist_ok=True)
  manual, data, runs, report = work / "manual", work / "tfds", work / "runs", work / "report"
  run = runs / "all_domains" / "fold0"
  py = sys.executable
  rows = []
  if not (manual / "MIDOG++.json").exists():
    rows.append(_stage("write synthetic TIFFs", [
        py, "-m", "midog_jax.synthetic", "--out", str(manual), "--cases-per-domain",
        str(args.cases_per_domain), "--width", str(args.width), "--height", str(args.height),
        "--seed", "0", "--density-scale", "1"], manual, work / "synthetic.log"))
  if not (data / "midogpp" / "full" / "1.1.0" / "dataset_info.json").exists():
    rows.append(_stage("tfds build", [
        str(pathlib.Path(py).parent / "tfds"), "build", "midogpp", "--imports", "tfds_midogpp",
        "--manual_dir", str(manual), "--data_dir", str(data)], data, work / "build.log"))
  info = json.loads((data / "midogpp" / "full" / "1.1.0" / "dataset_info.json").read_text())
  shards = {s["name"]: len(s.get("shardLengths", [])) for s in info["splits"]}
  print(json.dumps({"shards": shards}), flush=True)
  if not (run / "summary.json").exists():
    rows.append(_stage("train one epoch", [
        py, "-m", "midog_jax.train", "--config", str(ROOT / "configs" / "default.py"),
        "--workdir", str(run), f"--config.data_dir={data}", f"--config.patch_size={args.patch}",
        f"--config.batch_size={args.batch}", f"--config.train_patches_per_epoch={args.train_patches}",
        f"--config.valid_patches_per_epoch={args.valid_patches}", "--config.num_epochs=1",
        f"--config.cache_bytes={int(args.cache_gb * 2**30)}", f"--config.eval.batch_size={args.batch}",
        "--config.optim.max_lr=1e-3", "--config.model.body_weights=none"],
        run, work / "train.log"))
  if not (report / "runs.json").exists():
    rows.append(_stage("eval --runs", [
        py, "-m", "midog_jax.eval", "--runs", str(runs), "--out", str(report),
        "--data-dir", str(data), "--folds", "0"], report, work / "eval.log"))
  rows.append(_stage("eval --runs again (cached)", [
      py, "-m", "midog_jax.eval", "--runs", str(runs), "--out", str(report),
      "--data-dir", str(data), "--folds", "0"], report, work / "eval2.log"))
  print(json.dumps({**machine.describe(), "rois": args.cases_per_domain * 10,
                    "size": [args.width, args.height]}))
  return rows


if __name__ == "__main__":
  main()
