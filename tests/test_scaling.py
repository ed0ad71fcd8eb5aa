"""The bare train step gives the same losses and parameters on 1, 2, 4 and 8 devices.

Complements test_train.py (the trainer's augmented step, 1 against 8 devices,
one update): here `steps.make_train_step` itself, every power of two up to 8,
two updates each so BatchNorm statistics and momentum carry over. Plain SGD
with momentum, not AdamW: Adam divides the gradient by its own scale, so a
gradient off by a constant factor (a sum over devices taken for a mean)
would pass unseen.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import ROOT, env_without_accelerators

_SCRIPT = """
import json, sys
import jax, numpy as np, optax
from midog_jax import model as model_lib, steps
rng = np.random.default_rng(0)
images = rng.normal(size=(8, 64, 64, 3)).astype(np.float32)
centres = rng.uniform(25, 39, (8, 4, 2))
gt = np.concatenate([centres - 25, centres + 25], -1).astype(np.float32)
valid = rng.uniform(size=(8, 4)) < 0.7
model = model_lib.build_model(model_lib.RetinaNetConfig(), seed=0)
tx = optax.sgd(1e-2, momentum=0.9)
graphdef, initial = steps.init_train_state(model, tx)
out = {}
for n in (1, 2, 4, 8):
  mesh = steps.make_mesh(jax.devices()[:n])
  state = steps.replicate(initial, mesh)
  step = steps.make_train_step(graphdef, tx, mesh=mesh, donate=False)
  batch = steps.shard_batch((images, gt, valid), mesh)
  losses = []
  for _ in range(2):
    state, metrics = step(state, *batch)
    losses.append(float(metrics["loss"]))
  leaves = jax.tree.leaves(jax.device_get((state.params, state.batch_stats)))
  np.savez(sys.argv[1] + f"/{n}.npz", *leaves)
  out[n] = {"losses": losses,
            "devices": len(jax.tree.leaves(state.params)[0].sharding.device_set)}
print(json.dumps(out))
"""


def test_train_step_same_on_1_2_4_8_devices(tmp_path):
  env = env_without_accelerators()
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path)], capture_output=True,
                        text=True, env=env, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert [out[k]["devices"] for k in ("1", "2", "4", "8")] == [1, 2, 4, 8]
  ref = out["1"]["losses"]
  assert ref[1] != ref[0]  # The first update changed the model.
  base = np.load(tmp_path / "1.npz")
  for n in ("2", "4", "8"):
    # Same math; only the order of float32 reductions differs across devices.
    assert out[n]["losses"] == pytest.approx(ref, rel=1e-5)
    other = np.load(tmp_path / f"{n}.npz")
    assert len(other.files) == len(base.files) > 0
    for key in base.files:
      np.testing.assert_allclose(other[key], base[key], rtol=1e-4, atol=1e-6)
