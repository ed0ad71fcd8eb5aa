"""benchmarks/slides.py at a tiny size: it writes, reads, counts and projects."""

import json
import subprocess
import sys

from tests.helpers import ROOT, env_without_accelerators


def test_slides_benchmark_runs(tmp_path):
  env = env_without_accelerators()
  env.pop("XLA_FLAGS", None)
  out = tmp_path / "results.json"
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "slides.py"), "--sizes", "768x512",
       "--network", "none", "--patch", "64", "--batch", "4", "--workers", "2",
       "--dir", str(tmp_path), "--json", str(out)],
      capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert any(l.startswith("slide 768 x 512:") and "windows/s" in l and "peak RSS" in l
             and "MP/s per thread" in l for l in lines)
  assert any(l.startswith("projected:") and "100000 x 80000" in l for l in lines)
  results = json.loads(out.read_text())
  row = results["sizes"][0]
  assert row["windows"] > 0 and row["peak_rss_mb"] > 0 and row["read_mp_s_one_thread"] > 0
  # 100,000 x 80,000 px is 20,345 times this slide's area: the projection scales with it.
  assert abs(results["projected_100000x80000_seconds"] / row["seconds"]
             - 100_000 * 80_000 / (768 * 512)) < 1e-6 * 20_345
  assert (tmp_path / "out_768x512" / "slide_768x512" / "report.json").exists()
