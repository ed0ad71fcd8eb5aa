import os
import subprocess
import sys

from tests.helpers import ROOT, env_without_accelerators


def test_input_pipeline_benchmark_runs(tmp_path):
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "input_pipeline.py"), "--cases", "3",
       "--width", "400", "--height", "300", "--patch", "64", "--batch", "4",
       "--patches", "24", "--workers", "1,2", "--repeat", "1", "--workdir", str(tmp_path)],
      capture_output=True, text=True, env=env_without_accelerators(), timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [l for l in proc.stdout.splitlines() if l.endswith("patches/s")]
  modes = [l.split(": ")[0] for l in lines]
  assert modes == [
      "cached, fresh arrays, 1 thread", "cached, fresh arrays, 2 threads",
      "cached, refilled arrays, 1 thread", "cached, refilled arrays, 2 threads",
      "cached, refilled arrays, 1 process", "cached, refilled arrays, 2 processes",
      "streaming, 1 thread"]
  for line in lines:  # Every figure counts the whole epoch: 24 // 4 batches of 4.
    assert " 24 patches " in line and float(line.split(": ")[-1].split()[0].replace(",", "")) > 0


def test_input_pipeline_benchmark_without_tensorflow(tmp_path):
  # A `tensorflow` that cannot be imported, as on a host without it.
  (tmp_path / "tensorflow").mkdir()
  (tmp_path / "tensorflow" / "__init__.py").write_text("raise ImportError('no TensorFlow')")
  env = env_without_accelerators()
  env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "input_pipeline.py"), "--source", "memory",
       "--cases", "2", "--width", "300", "--height", "200", "--patch", "64", "--batch", "4",
       "--patches", "16", "--workers", "2", "--repeat", "1"],
      capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rates = [l for l in proc.stdout.splitlines() if l.endswith("patches/s")]
  assert [l.split(": ")[0] for l in rates] == [
      "cached, fresh arrays, 2 threads", "cached, refilled arrays, 2 threads",
      "cached, refilled arrays, 2 processes"]
