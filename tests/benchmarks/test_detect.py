import subprocess
import sys

from tests.helpers import ROOT, env_without_accelerators


def test_detect_benchmark_runs():
  env = env_without_accelerators()
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "detect.py"), "--patch", "64", "--batch", "4",
       "--dtype", "float32", "--width", "300", "--height", "200", "--steps", "2",
       # The tests' network: what runs is checked here, not the reference's speed.
       "--backbone", "resnet18_narrow", "--channels", "32"],
      capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert any(l.startswith("device:") and "windows/s" in l for l in lines)
  assert any(l.startswith("roi:") and "s per 300 x 200 ROI" in l for l in lines)
  cost = [l for l in lines if l.startswith("detect cost:")]
  assert len(cost) == 1 and "GFLOP/window" in cost[0] and "windows/s per device" in cost[0]
