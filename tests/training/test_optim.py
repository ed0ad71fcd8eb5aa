"""One-cycle schedules and AdamW against a transcription of fastai v1."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from midog_jax.model import retinanet as model_lib
from midog_jax.training import optim


def fastai_one_cycle(n, lr_max, moms=(0.95, 0.85), div=25.0, pct_start=0.3):
  """(lr, mom) used by each of n batches, as fastai v1's OneCycleScheduler.

  Written from `fastai/callbacks/one_cycle.py` and `Stepper` in
  `fastai/callback.py`, in float64.
  """
  def anneal_cos(start, end, pct):
    return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)

  a1 = int(n * pct_start)
  phases = [(a1, (lr_max / div, lr_max), moms),
            (n - a1, (lr_max, lr_max / div / 1e4), (moms[1], moms[0]))]
  lr, mom = lr_max / div, moms[0]
  out, idx, step = [], 0, 0
  for _ in range(n):
    out.append((lr, mom))
    if idx >= len(phases):
      continue
    n_iter, lrs, ms = phases[idx]
    n_iter, step = max(1, n_iter), step + 1
    lr = anneal_cos(*lrs, step / n_iter)
    mom = anneal_cos(*ms, step / n_iter)
    if step >= n_iter:
      idx, step = idx + 1, 0
  return out


@pytest.mark.parametrize("n", [1, 2, 3, 10, 100, 1037])
def test_schedules_match_fastai(n):
  lr, b1 = optim.one_cycle(5e-4, n), optim.one_cycle_b1(n)
  ref = fastai_one_cycle(n, 5e-4)
  k = jnp.arange(n)
  np.testing.assert_allclose(jax.vmap(lr)(k), [r[0] for r in ref], rtol=1e-5)
  np.testing.assert_allclose(jax.vmap(b1)(k), [r[1] for r in ref], rtol=1e-6)


def test_schedule_landmarks():
  n, top = 1000, 5e-5
  lr, b1 = optim.one_cycle(top, n), optim.one_cycle_b1(n)
  np.testing.assert_allclose(
      [lr(0), lr(300), lr(n)], [top / 25, top, top / 250_000], rtol=1e-6)
  np.testing.assert_allclose([b1(0), b1(300), b1(n)], [0.95, 0.85, 0.95],
                             rtol=1e-6)
  # Halfway through each phase the cosine is at the mean of its ends.
  np.testing.assert_allclose(lr(150), (top / 25 + top) / 2, rtol=1e-5)
  np.testing.assert_allclose(lr(650), (top + top / 250_000) / 2, rtol=1e-5)
  np.testing.assert_allclose(b1(650), 0.9, rtol=1e-6)
  # A quarter into warm-up: a + (b - a) * (1 - cos(pi / 4)) / 2.
  want = top / 25 + (top - top / 25) * (1 - math.cos(math.pi / 4)) / 2
  np.testing.assert_allclose(lr(75), want, rtol=1e-5)
  # Past the end it stays at the final value.
  np.testing.assert_allclose(lr(n + 50), top / 250_000, rtol=1e-6)
  assert float(optim.one_cycle(top, n, final_div=100.0)(n)) == pytest.approx(
      top / 100)


def test_bad_arguments():
  with pytest.raises(ValueError, match="total_steps"):
    optim.one_cycle(1e-3, 0)
  with pytest.raises(ValueError, match="pct_start"):
    optim.one_cycle(1e-3, 10, pct_start=1.5)


def test_adamw_matches_fastai_true_wd():
  """20 steps against PyTorch Adam + fastai's `p *= 1 - lr * wd`, by hand."""
  n, wd, b2, eps = 20, 0.01, 0.99, 1e-8
  rng = np.random.default_rng(0)
  p0 = rng.normal(size=(7,))
  grads = rng.normal(size=(n, 7))
  tx = optim.make_optimizer(n, max_lr=1e-2, weight_decay=wd)
  params = {"w": jnp.asarray(p0, jnp.float32)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  p, m, v = p0.copy(), np.zeros(7), np.zeros(7)
  for t, ((lr, b1), g) in enumerate(zip(fastai_one_cycle(n, 1e-2), grads), 1):
    u, state = update({"w": jnp.asarray(g, jnp.float32)}, state, params)
    params = jax.tree.map(lambda a, b: a + b, params, u)
    p = p * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    denom = np.sqrt(v) / math.sqrt(1 - b2**t) + eps
    p = p - lr / (1 - b1**t) * m / denom
  np.testing.assert_allclose(params["w"], p, rtol=1e-5, atol=1e-6)
  # The state records the values the last step used.
  hp = optim.hyperparams(state)
  assert float(hp["learning_rate"]) == pytest.approx(lr, rel=1e-5)
  assert float(hp["b1"]) == pytest.approx(b1, rel=1e-6)


@pytest.fixture(scope="module")
def retinanet_params():
  """A RetinaNet's parameter state with small random leaves, and its body's
  leaf count: the tree and paths are the model's, the sizes are not (fast)."""
  model = nnx.eval_shape(
      lambda: model_lib.RetinaNet(model_lib.RetinaNetConfig(),
                                  rngs=nnx.Rngs(0)))
  _, params, _ = nnx.split(model, nnx.Param, nnx.BatchStat)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  params = jax.tree.unflatten(
      treedef, [jax.random.normal(k, (3,)) + 2.0 for k in keys])
  late = [nnx.state(getattr(model.body, name), nnx.Param)
          for name in ("layer3", "layer4")]
  n_body = len(jax.tree.leaves(nnx.state(model.body, nnx.Param)))
  return params, (n_body, len(jax.tree.leaves(late)))


def _step(tx, params, grad_value):
  grads = jax.tree.map(lambda x: jnp.full_like(x, grad_value), params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  return updates


def _leaves(tree):
  return jax.tree_util.tree_leaves_with_path(tree)


def test_param_groups_follow_object_detection_fastai_split(retinanet_params):
  """Groups as `learn.split([encoder[6], c5top5])`: stem..layer2 | layer3,
  layer4 | FPN and heads."""
  params, (n_body, n_late) = retinanet_params
  labels = _leaves(optim.param_groups(params))
  counts = {g: sum(label == g for _, label in labels) for g in optim.LAYER_GROUPS}
  assert counts[optim.LATE] == n_late
  assert counts[optim.EARLY] == n_body - n_late
  assert counts[optim.HEAD] == len(labels) - n_body
  for path, label in labels:
    name = jax.tree_util.keystr(path)
    if name.startswith(("['body']['layer3']", "['body']['layer4']")):
      assert label == optim.LATE, name
    elif name.startswith("['body']"):
      assert label == optim.EARLY, name
    else:
      assert label == optim.HEAD, name


def test_even_mults_matches_fastai():
  # fastai v1: start * (stop / start) ** (i / (n - 1)).
  np.testing.assert_allclose(optim.even_mults(5e-5, 5e-4, 3),
                             [5e-5, 5e-5 * 10 ** 0.5, 5e-4], rtol=1e-12)
  np.testing.assert_allclose(
      optim.even_mults(1e-3, 1e-1, 5),
      [1e-3, 1e-3 * 10 ** 0.5, 1e-2, 1e-2 * 10 ** 0.5, 1e-1], rtol=1e-12)


def test_zero_gradient_step_is_pure_decay(retinanet_params):
  """Decoupled decay: with zero gradients, p -> p * (1 - lr0 * wd), BN too."""
  params, _ = retinanet_params
  lr0, wd = 5e-5 / 25, 0.01
  updates = _step(optim.make_optimizer(100, weight_decay=wd), params, 0.0)
  checked_bn = False
  for (path, u), (_, p) in zip(_leaves(updates), _leaves(params)):
    np.testing.assert_allclose(u, -lr0 * wd * p, rtol=1e-5, atol=1e-12)
    checked_bn |= "bn1" in jax.tree_util.keystr(path)
  assert checked_bn


def test_discriminative_rates(retinanet_params):
  params, _ = retinanet_params
  first, last, wd = 5e-5, 5e-4, 0.01
  peaks = dict(zip(optim.LAYER_GROUPS, [5e-5, 5e-5 * 10 ** 0.5, 5e-4]))
  tx = optim.make_optimizer(100, weight_decay=wd, discriminative=(first, last))
  labels = [label for _, label in _leaves(optim.param_groups(params))]
  # Pure decay shows each group's own learning rate.
  updates = _step(tx, params, 0.0)
  for label, (_, u), (_, p) in zip(labels, _leaves(updates), _leaves(params)):
    np.testing.assert_allclose(u, -peaks[label] / 25 * wd * p, rtol=1e-5,
                               atol=1e-12)
  # First Adam step with unit gradients and no decay moves by ~lr0.
  tx = optim.make_optimizer(100, weight_decay=0.0, discriminative=(first, last))
  updates = _step(tx, params, 1.0)
  for label, (_, u) in zip(labels, _leaves(updates)):
    np.testing.assert_allclose(u, -peaks[label] / 25, rtol=1e-5)
  hp = optim.hyperparams(tx.init(params))
  for group, peak in peaks.items():
    assert float(hp[f"{group}/learning_rate"]) == pytest.approx(peak / 25, rel=1e-6)
