"""Smoke test: the model-step benchmark runs on CPU at a tiny size."""

import os
import pathlib
import re
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).parents[1] / "benchmarks" / "model_step.py"


def test_benchmark_prints_rates():
  env = dict(os.environ)
  env.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  result = subprocess.run(
      [sys.executable, str(SCRIPT), "--patch", "64", "--batch", "4",
       "--dtype", "float32", "--devices", "2", "--warmup", "1", "--steps",
       "1"], capture_output=True, text=True, env=env, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  rates = dict(re.findall(r"^(train|forward):\s+([0-9.]+) img/s",
                          result.stdout, re.MULTILINE))
  assert set(rates) == {"train", "forward"}, result.stdout
  assert all(float(r) > 0 for r in rates.values())
  assert "x 2" in result.stdout  # two devices were used
