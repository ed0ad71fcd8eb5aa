import json
import subprocess
import sys

from tests.helpers import ROOT, env_without_accelerators


def test_stain_benchmark_runs(tmp_path):
  """At a tiny size, without the train step (its compilation is most of the time;
  benchmarks/model_step.py's test compiles one)."""
  out = tmp_path / "stain.json"
  env = env_without_accelerators()
  env.pop("XLA_FLAGS", None)  # One CPU device, as the figures are measured.
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "stain.py"), "--patch", "32", "--batch", "2",
       "--steps", "1", "--switches", "macenko", "--no-train-step",
       "--image", "200", "160", "--spread-seeds", "1", "--json", str(out)],
      capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  result = json.loads(out.read_text())
  seconds = result["seconds"]
  assert set(seconds) == {"plain", "macenko"} and min(seconds.values()) > 0
  extra = (seconds["macenko"] - seconds["plain"]) * 1e3
  assert f"macenko: {seconds['macenko'] * 1e3:.2f} ms augmentation, {extra:+.2f} ms" in lines
  assert result["fraction"] == {}  # No train step, no fraction of it.
  assert result["statistics_s"] > 0 and result["normalize_s_per_mpx"] > 0
  # Macenko brings the three scanners' colours of one tissue closer than they were.
  assert result["spread"]["macenko"][0] < result["spread"]["none"][0]
