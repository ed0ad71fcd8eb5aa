import subprocess
import sys

from tests.helpers import ROOT, env_without_accelerators


def test_input_pipeline_benchmark_runs(tmp_path):
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "input_pipeline.py"), "--cases", "3",
       "--width", "400", "--height", "300", "--patch", "64", "--batch", "4",
       "--patches", "24", "--workdir", str(tmp_path)],
      capture_output=True, text=True, env=env_without_accelerators(), timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for mode in ("cached", "streaming"):
    line = next(l for l in proc.stdout.splitlines() if l.startswith(mode))
    assert "patches/s" in line and float(line.split(": ")[-1].split()[0].replace(",", "")) > 0
