"""The jitted train step and forward pass, on one and on four devices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from midog_jax import model as M
from midog_jax import steps as S

PATCH, BATCH = 128, 8


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(BATCH, PATCH, PATCH, 3)).astype(np.float32)
  centres = rng.uniform(25, PATCH - 25, (BATCH, 5, 2))
  gt = np.concatenate([centres - 25, centres + 25], -1).astype(np.float32)
  valid = rng.uniform(size=(BATCH, 5)) < 0.6
  valid[:, 0] = True
  return images, gt, valid


@pytest.fixture(scope="module")
def model():
  return M.build_model(M.RetinaNetConfig(), seed=0)


def _run(model, batch, n_devices: int, n_steps: int):
  tx = optax.adamw(1e-3)
  graphdef, state = S.init_train_state(model, tx)
  mesh = S.make_mesh(jax.devices()[:n_devices])
  step = S.make_train_step(graphdef, tx, mesh=mesh)
  state = S.replicate(state, mesh)
  inputs = S.shard_batch(batch, mesh)
  assert inputs[0].sharding.num_devices == n_devices
  history = []
  for _ in range(n_steps):
    state, metrics = step(state, *inputs)
    history.append(jax.device_get(metrics))
  return graphdef, state, history


@pytest.fixture(scope="module")
def one_device(model, batch):
  return _run(model, batch, 1, 4)


def test_train_step_same_on_one_and_four_devices(model, batch, one_device):
  _, state1, hist1 = one_device
  _, state4, hist4 = _run(model, batch, 4, 2)
  for key in ("loss", "focal", "box", "num_positives"):
    np.testing.assert_allclose(hist4[0][key], hist1[0][key], rtol=1e-5)
  # The second step sees parameters and BatchNorm stats after the first.
  np.testing.assert_allclose(hist4[1]["loss"], hist1[1]["loss"], rtol=1e-4)
  assert hist1[0]["num_positives"] > 0
  # Replicated parameters come back on every device of the mesh.
  leaf = jax.tree.leaves(state4.params)[0]
  assert leaf.sharding.num_devices == 4 and leaf.sharding.is_fully_replicated


def test_train_step_learns_and_updates_batch_stats(model, one_device):
  _, state, history = one_device
  losses = [h["loss"] for h in history]
  assert losses[-1] < losses[0]
  before = jax.tree.leaves(S.split_model(model)[2])
  after = jax.tree.leaves(state.batch_stats)
  assert any(not np.allclose(a, b) for a, b in zip(after, before))
  # The model object is untouched by the donated train state.
  assert all(np.isfinite(np.asarray(b)).all() for b in before)


def test_forward_matches_eager_model_and_shards(model, batch):
  images = batch[0]
  graphdef, params, stats = S.split_model(model)
  expected = model(jnp.asarray(images), train=False)
  for n in (1, 4):
    mesh = S.make_mesh(jax.devices()[:n])
    forward = S.make_forward(graphdef, mesh=mesh)
    cls, box = forward(S.replicate(params, mesh), S.replicate(stats, mesh),
                       S.shard_batch(images, mesh))
    np.testing.assert_allclose(cls, expected[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(box, expected[1], rtol=1e-5, atol=1e-5)
    assert cls.sharding.num_devices == n
  scores = S.scores(expected[0])
  assert scores.shape == expected[0].shape[:2]
  np.testing.assert_allclose(scores, jax.nn.sigmoid(-4.0), rtol=1e-6)
