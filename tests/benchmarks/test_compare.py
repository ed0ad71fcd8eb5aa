"""compare.py and the model-step benchmark: tiny CPU runs, no TensorFlow, same loss."""

import re
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import ROOT, env_without_accelerators

torch = pytest.importorskip("torch")

# Runs compare.py's main in-process, then reports what got imported.
_SCRIPT = """
import sys
sys.path.insert(0, {bench!r})
import compare
compare.main(["--device", "cpu", "--patch", "64", "--batch", "2", "--dtype", "float32",
              "--warmup", "1", "--steps", "1"])
print("modules:", "tensorflow" in sys.modules, "model_step" in sys.modules,
      "flops" in sys.modules)
"""


def test_compare_prints_both_rates_and_ratio_without_tensorflow():
  env = env_without_accelerators()
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, "-c", _SCRIPT.format(bench=str(ROOT / "benchmarks"))],
      capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = re.findall(r"^(train|forward)\s+torch\s+([0-9.]+) img/s\s+jax\s+([0-9.]+) img/s"
                    r"\s+ratio jax/torch ([0-9.]+)$", proc.stdout, re.MULTILINE)
  assert [r[0] for r in rows] == ["train", "forward"], proc.stdout
  for _, t, j, ratio in rows:
    assert float(t) > 0 and float(j) > 0
    assert float(ratio) == pytest.approx(float(j) / float(t), rel=0.02, abs=0.01)
  # The accelerator machine has no TensorFlow: these code paths must not need it.
  assert "modules: False True True" in proc.stdout, proc.stdout


def test_peer_is_the_same_network_and_loss():
  sys.path.insert(0, str(ROOT / "benchmarks"))
  try:
    import torch_peer
  finally:
    sys.path.remove(str(ROOT / "benchmarks"))
  from flax import nnx
  from midog_jax.model import boxes
  from midog_jax.model import losses
  from midog_jax.model import retinanet as model_lib

  for all_levels in (False, True):
    config = model_lib.RetinaNetConfig(build_all_levels=all_levels)
    shapes = nnx.eval_shape(lambda: model_lib.RetinaNet(config, rngs=nnx.Rngs(0)))
    assert torch_peer.count_params(torch_peer.RetinaNet(all_levels=all_levels)) == (
        model_lib.count_params(shapes))
  patch = 128
  anchors = boxes.anchor_grid((patch, patch), (4,))
  np.testing.assert_allclose(torch_peer.anchors(patch).numpy(), anchors, atol=1e-7)
  rng = np.random.default_rng(0)
  centres = rng.uniform(25, patch - 25, (3, 6, 2))
  gt = np.concatenate([centres - 25, centres + 25], -1).astype(np.float32)
  valid = rng.uniform(size=(3, 6)) < 0.6
  cls = rng.normal(0, 2, (3, len(anchors), 2)).astype(np.float32)
  box = rng.normal(0, 1, (3, len(anchors), 4)).astype(np.float32)
  expected, metrics = losses.retinanet_loss(cls, box, anchors, gt, valid, (patch, patch))
  assert int(metrics["num_positives"]) > 0  # The box loss takes part.
  got = torch_peer.retinanet_loss(*map(torch.from_numpy, (cls, box, anchors, gt, valid)),
                                  patch)
  assert float(got) == pytest.approx(float(expected), rel=1e-5)
