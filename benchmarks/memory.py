"""Host memory of a long training run: does it stay flat after warm-up?

Writes and builds the demo's synthetic MIDOG++ (unless --data-dir is given),
trains `configs/demo.py` for --steps steps in a child process, and samples
the child's resident memory (VmRSS) every --every seconds. Prints the RSS
after warm-up (the first --warmup fraction of the run) and at the end, and
the growth between them; a leak shows as growth that keeps rising with the
number of steps.

  python benchmarks/memory.py --workdir /tmp/midog_memory [--steps 3000]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _rss_gb(pid: int) -> float | None:
  try:
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) / 2**20
  except FileNotFoundError:
    return None
  return None


def _steps_done(workdir: pathlib.Path) -> int:
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return 0
  lines = [l for l in path.read_text().splitlines() if l.strip()]
  return json.loads(lines[-1])["step"] if lines else 0


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--data-dir", default=None, help="a built midogpp (default: the demo's)")
  parser.add_argument("--steps", type=int, default=3000)
  parser.add_argument("--every", type=float, default=2.0, help="seconds between samples")
  parser.add_argument("--warmup", type=float, default=0.1, help="share of steps before the baseline")
  args = parser.parse_args(argv)
  work = pathlib.Path(args.workdir).resolve()
  work.mkdir(parents=True, exist_ok=True)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
  data_dir = args.data_dir
  if data_dir is None:
    data_dir = str(work / "tfds")
    if not (pathlib.Path(data_dir) / "midogpp").exists():
      manual = str(work / "manual")
      subprocess.run([sys.executable, "-c", (
          "import tensorflow_datasets as tfds\n"
          "from configs import demo\n"
          "from midog_jax.data import synthetic\n"
          "from tfds_midogpp.midogpp import midogpp_dataset_builder as b\n"
          "s = demo.get_config().synthetic\n"
          f"synthetic.write_dataset({manual!r}, s.cases_per_domain, s.width, s.height, "
          "seed=s.seed, density_scale=s.density_scale, progress=False)\n"
          f"b.Builder(data_dir={data_dir!r}).download_and_prepare(download_config="
          f"tfds.download.DownloadConfig(manual_dir={manual!r}))\n")],
          env=env, check=True, cwd=ROOT)
  steps_per_epoch = 160 // 8  # configs/demo.py: 160 patches per epoch, batch 8.
  epochs = max(1, args.steps // steps_per_epoch)
  run = work / "run"
  cmd = [sys.executable, "-m", "midog_jax.train", "--config", str(ROOT / "configs" / "demo.py"),
         "--workdir", str(run), f"--config.data_dir={data_dir}",
         f"--config.num_epochs={epochs}", f"--config.eval.every_epochs={max(1, epochs // 10)}"]
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=open(work / "train.log", "w"))
  samples = []  # (seconds, steps done, RSS GB)
  while proc.poll() is None:
    rss = _rss_gb(proc.pid)
    if rss is not None:
      samples.append((time.perf_counter() - t0, _steps_done(run), rss))
    time.sleep(args.every)
  if proc.returncode:
    raise SystemExit(f"training failed; see {work / 'train.log'}")
  total = epochs * steps_per_epoch
  after = [s for s in samples if s[1] >= args.warmup * total]
  base, end = after[0][2], after[-1][2]
  peak = max(s[2] for s in after)
  result = {"steps": total, "seconds": round(samples[-1][0], 1),
            "rss_after_warmup_gb": round(base, 3), "rss_end_gb": round(end, 3),
            "rss_peak_gb": round(peak, 3), "growth_percent": round(100 * (end - base) / base, 2)}
  (work / "memory_samples.json").write_text(json.dumps(samples))
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
