"""Smoke test: the scoring benchmark runs at a tiny size and prints timings."""

import pathlib
import re
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).parents[2] / "benchmarks" / "scoring.py"


def test_benchmark_prints_timings():
  result = subprocess.run(
      [sys.executable, str(SCRIPT), "--cases", "4", "--detections", "300",
       "--gt", "9", "--repeats", "1"],
      capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  times = dict(re.findall(r"^(\w+): ([0-9.]+) s$", result.stdout, re.MULTILINE))
  assert set(times) == {"f1", "ap", "score", "sweep"}, result.stdout
  assert all(float(t) >= 0 for t in times.values())
