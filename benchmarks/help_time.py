"""Seconds until each command's `--help` is printed, in a fresh process.

    python benchmarks/help_time.py [--repeats 5] [--root DIR]

Runs `python -m midog_jax.X --help` for every entry point, `--repeats`
times each, and prints the best and the median wall time with the exit
status. `--root` times another checkout (e.g. an older commit unpacked with
`git archive`), so two versions can be compared on the same machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

COMMANDS = (
    ("train", ()), ("detect", ()), ("eval", ()), ("eval", ("score",)), ("demo", ()),
    ("stats", ()), ("weights", ()), ("experiments", ()), ("synthetic", ()),
)


def time_help(root: str, module: str, extra: tuple[str, ...]) -> tuple[float, int]:
  """(seconds, exit status) of one `--help` in a fresh interpreter."""
  env = dict(os.environ, PYTHONPATH=root, CUDA_VISIBLE_DEVICES="")
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", f"midog_jax.{module}", *extra, "--help"],
                        cwd=root, env=env, capture_output=True)
  return time.perf_counter() - start, proc.returncode


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      help="checkout to time (default: this one)")
  args = parser.parse_args()
  print(f"{'command':<24} {'best s':>7} {'median s':>9} {'exit':>5}")
  for module, extra in COMMANDS:
    if not os.path.exists(os.path.join(args.root, "midog_jax", f"{module}.py")):
      continue
    runs = [time_help(args.root, module, extra) for _ in range(args.repeats)]
    seconds = [s for s, _ in runs]
    codes = sorted({c for _, c in runs})
    name = " ".join((module, *extra))
    print(f"{name:<24} {min(seconds):>7.2f} {statistics.median(seconds):>9.2f} "
          f"{','.join(map(str, codes)):>5}", flush=True)


if __name__ == "__main__":
  main()
