"""The RetinaNet's structure, size, initialisation and level selection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from midog_jax.model import layers
from midog_jax.model import retinanet


def _abstract(config: retinanet.RetinaNetConfig) -> retinanet.RetinaNet:
  """The model with shapes only: counting needs no initialisation."""
  return nnx.eval_shape(lambda: retinanet.RetinaNet(config, rngs=nnx.Rngs(0)))


def _conv_params(k: int, cin: int, cout: int) -> int:
  return k * k * cin * cout + cout  # FPN and head convs all have a bias.


def test_parameter_count_matches_reference():
  full = _abstract(retinanet.RetinaNetConfig(build_all_levels=True))
  assert retinanet.count_params(full.body) == 11_176_512
  assert retinanet.count_params(full) == 13_391_966
  # Asking for every level builds the same network.
  every = _abstract(retinanet.RetinaNetConfig(levels=(3, 4, 5, 6, 7)))
  assert retinanet.count_params(every) == 13_391_966

  # With only P4 (the default) the network leaves out the convs no head
  # reads: P6 (3x3 s2, 512->128), P7 (3x3 s2, 128->128), P3's lateral
  # (1x1, 128->128) and the smoothing of P3 and P5 (3x3, 128->128). P5's
  # lateral stays: P4's top-down path starts there.
  unused = (_conv_params(3, 512, 128) + _conv_params(3, 128, 128)
            + _conv_params(1, 128, 128) + 2 * _conv_params(3, 128, 128))
  default = _abstract(retinanet.RetinaNetConfig())
  assert retinanet.count_params(default) == 13_391_966 - unused == 12_342_750
  fpn = default.fpn
  assert fpn.p6_conv is None and fpn.p7_conv is None
  assert fpn.p3_lateral is None and fpn.p3_smooth is None
  assert fpn.p5_smooth is None and fpn.p5_lateral is not None


def test_dtypes_and_batchnorm_state():
  model = retinanet.RetinaNet(retinanet.RetinaNetConfig(dtype="bfloat16"), rngs=nnx.Rngs(0))
  for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
    assert leaf.dtype == jnp.float32
  stats = jax.tree.leaves(nnx.state(model, nnx.BatchStat))
  assert stats and all(s.dtype == jnp.float32 for s in stats)
  cls, box = model(jnp.zeros((1, 32, 32, 3)), train=True)
  assert cls.dtype == box.dtype == jnp.float32
  c3, _, _ = model.body(jnp.zeros((1, 32, 32, 3)))
  assert c3.dtype == jnp.bfloat16


def test_outputs_follow_anchor_layout_and_init():
  config = retinanet.RetinaNetConfig(levels=(3, 5))
  model = retinanet.RetinaNet(config, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 128, 96, 3))
  cls, box = model(x)
  anchors = model.anchors((128, 96))
  assert cls.shape == (2, anchors.shape[0], 2)
  assert box.shape == (2, anchors.shape[0], 4)
  # Output convs start at zero weight: logits are the bias, deltas zero.
  np.testing.assert_array_equal(cls, config.class_bias)
  np.testing.assert_array_equal(box, 0.0)
  one = retinanet.RetinaNet(retinanet.RetinaNetConfig(num_classes=1), rngs=nnx.Rngs(0))
  assert one(x)[0].shape == (2, one.anchors((128, 96)).shape[0], 1)


def test_kaiming_init_of_head_convs():
  model = retinanet.RetinaNet(retinanet.RetinaNetConfig(), rngs=nnx.Rngs(0))
  kernel = np.asarray(model.classifier.convs[0].kernel[...])
  std = np.sqrt(2 / (3 * 3 * 128))
  assert abs(kernel.std() / std - 1) < 0.02
  assert abs(kernel.mean()) < 0.05 * std
  # Untruncated normal: some weights lie beyond two standard deviations.
  assert (np.abs(kernel) > 2 * std).mean() > 0.03
  np.testing.assert_array_equal(model.classifier.convs[0].bias[...], 0.0)


@pytest.fixture(scope="module")
def trained_all_levels():
  """A model with every level whose heads were changed from their init."""
  model = retinanet.RetinaNet(retinanet.RetinaNetConfig(levels=(3, 4, 5, 6, 7)),
                      rngs=nnx.Rngs(0))
  for head in (model.classifier, model.box_regressor):
    k = head.out.kernel[...]
    head.out.kernel[...] = 0.01 * jax.random.normal(jax.random.key(2), k.shape)
  return model


def test_level_selection_computes_the_same_maps(trained_all_levels):
  """A model built for some levels equals the full model on those levels."""
  full = trained_all_levels
  x = jax.random.normal(jax.random.key(3), (2, 128, 128, 3))
  cls_all, box_all = full(x)
  counts = [retinanet.box_lib.anchor_grid((128, 128), (lvl,)).shape[0]
            for lvl in retinanet.ALL_LEVELS]
  starts = dict(zip(retinanet.ALL_LEVELS, np.cumsum([0] + counts[:-1])))
  flat_full = dict(nnx.to_flat_state(nnx.state(full)))
  for levels in [(4,), (3, 6), (7,)]:
    part = retinanet.RetinaNet(retinanet.RetinaNetConfig(levels=levels), rngs=nnx.Rngs(5))
    flat = nnx.to_flat_state(nnx.state(part))
    nnx.update(part, nnx.from_flat_state(
        [(path, flat_full[path]) for path, _ in flat]))
    cls, box = part(x)
    idx = np.concatenate([
        np.arange(starts[lvl], starts[lvl] + counts[retinanet.ALL_LEVELS.index(lvl)])
        for lvl in levels])
    np.testing.assert_allclose(cls, cls_all[:, idx], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(box, box_all[:, idx], rtol=1e-5, atol=1e-5)


def test_batchnorm_follows_torch_semantics():
  bn = layers.BatchNorm(3)
  x = jax.random.normal(jax.random.key(0), (4, 5, 5, 3)) * 2 + 1
  y = bn(x, train=True)
  xs = np.asarray(x).reshape(-1, 3)
  np.testing.assert_allclose(
      y, ((xs - xs.mean(0)) / np.sqrt(xs.var(0) + 1e-5)).reshape(x.shape),
      rtol=1e-4, atol=1e-4)
  # Running stats: momentum 0.1, unbiased variance, as torch.
  np.testing.assert_allclose(bn.mean[...], 0.1 * xs.mean(0), rtol=1e-5)
  np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * xs.var(0, ddof=1),
                             rtol=1e-5)
  y_eval = bn(x, train=False)
  expected = (xs - bn.mean[...]) / np.sqrt(bn.var[...] + 1e-5)
  np.testing.assert_allclose(y_eval, expected.reshape(x.shape), rtol=1e-4,
                             atol=1e-4)


def test_invalid_levels_rejected():
  with pytest.raises(ValueError):
    retinanet.RetinaNet(retinanet.RetinaNetConfig(levels=(2,)), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError):
    retinanet.RetinaNet(retinanet.RetinaNetConfig(levels=()), rngs=nnx.Rngs(0))
