"""Smoke test: the model-step benchmark runs on CPU at a tiny size; its FLOP count."""

import os
import pathlib
import re
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).parents[2] / "benchmarks" / "model_step.py"


def test_benchmark_prints_rates():
  env = dict(os.environ)
  env.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  result = subprocess.run(
      [sys.executable, str(SCRIPT), "--patch", "64", "--batch", "4",
       "--dtype", "float32", "--devices", "2", "--warmup", "1", "--steps",
       "1", "--backbone", "resnet18_narrow", "--channels", "32"], capture_output=True, text=True, env=env, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  rates = dict(re.findall(r"^(train|forward):\s+([0-9.]+) img/s",
                          result.stdout, re.MULTILINE))
  assert set(rates) == {"train", "forward"}, result.stdout
  assert all(float(r) > 0 for r in rates.values())
  assert "x 2" in result.stdout  # two devices were used
  costs = dict(re.findall(r"^(train|forward) cost: ([0-9.]+) GFLOP/image.*"
                          r"per device \(2 x cpu\)$", result.stdout, re.MULTILINE))
  assert set(costs) == {"train", "forward"}, result.stdout
  # Backward costs about twice the forward pass.
  assert 2 < float(costs["train"]) / float(costs["forward"]) < 4


def test_flops_count_every_device():
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  sys.path.insert(0, str(SCRIPT.parent))
  try:
    import flops
  finally:
    sys.path.remove(str(SCRIPT.parent))
  from midog_jax import sharding

  w, x = jnp.ones((32, 16)), jnp.ones((8, 32))
  for n in (1, 2, 4):
    mesh = sharding.make_mesh(jax.devices()[:n])
    f = jax.jit(lambda w, x: x @ w, in_shardings=(NamedSharding(mesh, P()),
                                                  NamedSharding(mesh, P("data"))))
    assert flops.compiled_flops(f, w, x, n_devices=n) == 2 * 8 * 32 * 16
  assert flops.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16")[0] == 989.0
  assert flops.peak_tflops("NVIDIA H100 PCIe", "bfloat16")[0] == 756.0
  assert flops.peak_tflops("NVIDIA H200", "float32")[0] is None
  assert flops.utilisation(1e12, 100.0, 2, 100.0) == 0.5
