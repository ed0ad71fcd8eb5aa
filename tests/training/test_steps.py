"""The jitted train step and forward pass, on one and on several devices.

Complements test_train.py (the trainer's augmented step, 1 against 8 devices,
one update): here `steps.make_train_step` itself on 1, 2, 4 and 8 devices.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from midog_jax import sharding
from midog_jax.model import retinanet as M
from midog_jax.training import steps
from tests.train_fixtures import TEST_NETWORK

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


# The tests' network (tests/train_fixtures.py): the step's sharding, not the architecture.
NETWORK = M.RetinaNetConfig(backbone=TEST_NETWORK["model.backbone"],
                            channels=TEST_NETWORK["model.channels"])


@pytest.fixture(scope="module")
def model():
  return M.build_model(NETWORK, seed=0)


def _run(model, batch, n_devices: int, n_steps: int):
  tx = optax.adamw(1e-3)
  graphdef, state = steps.init_train_state(model, tx)
  mesh = sharding.make_mesh(jax.devices()[:n_devices])
  step = steps.make_train_step(graphdef, tx, mesh=mesh)
  state = sharding.replicate(state, mesh)
  inputs = sharding.shard_batch(batch, mesh)
  assert inputs[0].sharding.num_devices == n_devices
  history = []
  for _ in range(n_steps):
    state, metrics = step(state, *inputs)
    history.append(jax.device_get(metrics))
  return graphdef, state, history


@pytest.fixture(scope="module")
def one_device(model, batch):
  return _run(model, batch, 1, 4)


def test_train_step_same_on_1_2_4_8_devices(model):
  """Two updates each, so BatchNorm statistics and momentum carry over.

  Plain SGD with momentum, not AdamW: Adam divides the gradient by its own
  scale, so a gradient off by a constant factor (a sum over devices taken
  for a mean) would pass unseen.
  """
  rng = np.random.default_rng(0)
  images = rng.normal(size=(8, 64, 64, 3)).astype(np.float32)
  centres = rng.uniform(25, 39, (8, 4, 2))
  gt = np.concatenate([centres - 25, centres + 25], -1).astype(np.float32)
  valid = rng.uniform(size=(8, 4)) < 0.7
  tx = optax.sgd(1e-2, momentum=0.9)
  graphdef, initial = steps.init_train_state(model, tx)
  out = {}
  for n in (1, 2, 4, 8):
    mesh = sharding.make_mesh(jax.devices()[:n])
    step = steps.make_train_step(graphdef, tx, mesh=mesh, donate=False)
    state, history = sharding.replicate(initial, mesh), []
    for _ in range(2):
      state, metrics = step(state, *sharding.shard_batch((images, gt, valid), mesh))
      history.append(jax.device_get(metrics))
    leaf = jax.tree.leaves(state.params)[0]
    # Replicated parameters come back on every device of the mesh.
    assert leaf.sharding.num_devices == n and leaf.sharding.is_fully_replicated
    out[n] = history, jax.device_get((state.params, state.batch_stats))
  ref, ref_state = out[1]
  assert ref[0]["num_positives"] > 0 and ref[1]["loss"] != ref[0]["loss"]
  for n in (2, 4, 8):
    history, state = out[n]
    # Same math; only the order of float32 reductions differs across devices.
    for key in ("loss", "focal", "box", "num_positives"):
      np.testing.assert_allclose(history[0][key], ref[0][key], rtol=1e-5, err_msg=f"{n} {key}")
    np.testing.assert_allclose(history[1]["loss"], ref[1]["loss"], rtol=1e-5)
    leaves, expected = jax.tree.leaves(state), jax.tree.leaves(ref_state)
    assert len(leaves) == len(expected) > 0
    for a, b in zip(leaves, expected):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_train_step_learns_and_updates_batch_stats(model, one_device):
  _, state, history = one_device
  losses = [h["loss"] for h in history]
  assert losses[-1] < losses[0]
  before = jax.tree.leaves(steps.split_model(model)[2])
  after = jax.tree.leaves(state.batch_stats)
  assert any(not np.allclose(a, b) for a, b in zip(after, before))
  # The model object is untouched by the donated train state.
  assert all(np.isfinite(np.asarray(b)).all() for b in before)


def test_forward_matches_eager_model_and_shards(model, batch):
  images = batch[0]
  graphdef, params, stats = steps.split_model(model)
  expected = model(jnp.asarray(images), train=False)
  for n in (1, 4):
    mesh = sharding.make_mesh(jax.devices()[:n])
    forward = M.make_forward(graphdef, mesh=mesh)
    cls, box = forward(sharding.replicate(params, mesh), sharding.replicate(stats, mesh),
                       sharding.shard_batch(images, mesh))
    np.testing.assert_allclose(cls, expected[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(box, expected[1], rtol=1e-5, atol=1e-5)
    assert cls.sharding.num_devices == n
  scores = M.scores(expected[0])
  assert scores.shape == expected[0].shape[:2]
  np.testing.assert_allclose(scores, jax.nn.sigmoid(-4.0), rtol=1e-6)


def test_abstract_train_state_has_the_shapes_of_the_real_one(model):
  tx = optax.adamw(1e-3)
  graphdef, state = steps.init_train_state(model, tx)
  mesh = sharding.make_mesh(jax.devices()[:2])
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract_graphdef, abstract = steps.abstract_train_state(
      lambda: M.RetinaNet(NETWORK, rngs=nnx.Rngs(0)), tx, replicated)
  assert abstract_graphdef == graphdef
  assert jax.tree.structure(abstract) == jax.tree.structure(state)
  for a, x in zip(jax.tree.leaves(abstract), jax.tree.leaves(state)):
    assert isinstance(a, jax.ShapeDtypeStruct) and a.sharding == replicated
    assert (a.shape, a.dtype) == (x.shape, x.dtype)
