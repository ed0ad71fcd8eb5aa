"""Two processes on 127.0.0.1 train the tiny config and end identical."""

import socket
import subprocess
import sys

from tests.helpers import ROOT, env_without_accelerators


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_identically(synthetic_data_dir, tmp_path):
  data_dir = synthetic_data_dir  # Read by both processes, written by neither.
  env = env_without_accelerators()
  env.pop("XLA_FLAGS", None)  # One CPU device per process.
  env["PYTHONPATH"] = str(ROOT)
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, str(ROOT / "tests" / "system" / "scripts" / "distributed_train.py"), str(i),
       str(port), data_dir, str(tmp_path / "run"), str(tmp_path / f"out{i}.txt")],
      env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-4000:]
  a, b = [(tmp_path / f"out{i}.txt").read_text().split() for i in range(2)]
  assert a == b  # Same parameters, same cases, same share of patches.
  _, status, n_train, local_patches = a
  assert status == "finished" and int(n_train) == 16
  assert int(local_patches) == 8  # Each host crops half of the 16 patches.
