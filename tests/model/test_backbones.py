"""The backbone table: a registered toy body builds, trains in its layer groups, loads weights."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import demo
from midog_jax.model import backbones
from midog_jax.model import layers
from midog_jax.model import retinanet
from midog_jax.model import weights
from midog_jax.training import optim


class _ToyBody(nnx.Module):
  """Three strided convolutions: C3, C4, C5 at strides 8, 16, 32."""

  def __init__(self, *, dtype, rngs):
    kw = dict(bias=True, init=layers.KAIMING_OUT, dtype=dtype, rngs=rngs)
    self.stem = layers.conv(3, 8, 3, 8, **kw)
    self.mid = layers.conv(8, 16, 3, 2, **kw)
    self.late = layers.conv(16, 24, 3, 2, **kw)

  def __call__(self, x, train=False):
    del train
    c3 = jax.nn.relu(self.stem(x))
    c4 = jax.nn.relu(self.mid(c3))
    return c3, c4, jax.nn.relu(self.late(c4))


TOY = backbones.Backbone(make=_ToyBody, feature_channels=(8, 16, 24),
                         late_layers=frozenset({"late"}),
                         weight_name=lambda path: "toy." + ".".join(path))


@pytest.fixture
def toy(monkeypatch):
  monkeypatch.setitem(backbones.BACKBONES, "toy", TOY)


def _config(**model) -> ml_collections.ConfigDict:
  config = demo.get_config()
  config.model.update(model)
  return config


def test_a_registered_backbone_builds_the_detector_and_its_layer_groups(toy):
  config = _config(backbone="toy")
  net_config = retinanet.RetinaNetConfig.from_config(config)
  assert net_config.backbone == "toy"
  model = retinanet.build_model(net_config, seed=0)
  assert isinstance(model.body, _ToyBody)
  assert model.fpn.p4_lateral.kernel.shape == (1, 1, 16, 128)  # C4's width from the table.
  images = jnp.zeros((2, 64, 64, 3))
  logits, deltas = model(images)
  assert logits.shape[:2] == deltas.shape[:2] == (2, len(model.anchors((64, 64))))

  _, params, _ = nnx.split(model, nnx.Param, nnx.BatchStat)
  labels = {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): label
            for path, label in
            jax.tree_util.tree_flatten_with_path(
                optim.param_groups(params, TOY.late_layers))[0]}
  assert {k: v for k, v in labels.items() if k.startswith("body/")} == {
      "body/stem/bias/value": optim.EARLY, "body/stem/kernel/value": optim.EARLY,
      "body/mid/bias/value": optim.EARLY, "body/mid/kernel/value": optim.EARLY,
      "body/late/bias/value": optim.LATE, "body/late/kernel/value": optim.LATE}
  # The optimiser of a config with discriminative rates uses the same split.
  config.optim.discriminative = (1e-4, 1e-3)
  tx = optim.from_config(config, total_steps=10)
  state = tx.init(params)
  assert set(state.inner_states) == set(optim.LAYER_GROUPS)


def test_a_registered_backbone_loads_weights_by_its_own_names(toy, tmp_path):
  shapes = TOY.weight_shapes()
  assert shapes["toy.late.kernel"] == (3, 3, 16, 24)
  arrays = {k: np.full(s, 0.25, np.float32) for k, s in shapes.items()}
  path = tmp_path / "toy.npz"
  weights.write_npz(str(path), arrays)
  model = retinanet.build_model(retinanet.RetinaNetConfig(backbone="toy", body_weights=str(path)))
  np.testing.assert_array_equal(np.asarray(model.body.late.kernel[...]), 0.25)
  del arrays["toy.mid.bias"]
  weights.write_npz(str(path), arrays)
  with pytest.raises(weights.WeightsError, match="missing \\(1\\): toy.mid.bias"):
    retinanet.build_model(retinanet.RetinaNetConfig(backbone="toy", body_weights=str(path)))
  with pytest.raises(weights.WeightsError, match="no ImageNet weights"):
    retinanet.build_model(retinanet.RetinaNetConfig(backbone="toy", body_weights="imagenet"))


def test_an_unknown_backbone_lists_the_known_ones():
  with pytest.raises(ValueError, match="model.backbone 'resnet50'.*'resnet18'"):
    retinanet.RetinaNet(retinanet.RetinaNetConfig(backbone="resnet50"), rngs=nnx.Rngs(0))


def test_the_narrow_resnet18_is_the_same_network_at_a_quarter_of_the_width():
  """Every variable of ResNet18 under the same name, each channel count a quarter (the
  RGB input aside); its features at the strides and widths it declares."""
  narrow, full = backbones.get("resnet18_narrow"), backbones.get("resnet18")
  small, large = narrow.weight_shapes(), full.weight_shapes()
  assert sorted(small) == sorted(large)
  for name, shape in large.items():
    if len(shape) == 4:  # HWIO kernels: the input of conv1 is RGB, not a width.
      want = (*shape[:2], 3 if shape[2] == 3 else shape[2] // 4, shape[3] // 4)
    else:
      want = tuple(d // 4 for d in shape)
    assert small[name] == want, name
  body = narrow.make(dtype=jnp.float32, rngs=nnx.Rngs(0))
  c3, c4, c5 = body(jnp.zeros((1, 64, 64, 3)))
  assert [c.shape for c in (c3, c4, c5)] == [
      (1, 8, 8, 32), (1, 4, 4, 64), (1, 2, 2, 128)]
  assert narrow.feature_channels == (32, 64, 128) and not narrow.pretrained
  # A run names it and the FPN's width in its configuration.
  config = demo.get_config()
  config.model.update(backbone="resnet18_narrow", channels=32)
  model_config = retinanet.RetinaNetConfig.from_config(config, pretrained=False)
  assert (model_config.backbone, model_config.channels) == ("resnet18_narrow", 32)
