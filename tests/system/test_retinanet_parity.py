"""The whole RetinaNet against a PyTorch transcription of the reference's.

The transcription follows object_detection_fastai's `RetinaNet` as the
MIDOG++ code builds it (`create_body(resnet18, True, -2)`, 128 channels,
3 convs per subnet, 5 anchor scales, `sizes` selecting pyramid levels by
their side), its `create_anchors` and `activ_to_bbox` and the clamping of
`process_output`. The same weights go into both; class logits, box deltas,
anchors, decoded boxes and scores must agree.
"""

import math

import jax
import numpy as np
import pytest
from flax import nnx

from midog_jax.model import boxes as box_lib
from midog_jax.model import retinanet as M
from midog_jax.model import weights as W

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional
from tests.model.test_weights import _ResNet18  # noqa: E402  torchvision's layout.


def _conv(cin, cout, k=3, stride=1):
  return nn.Conv2d(cin, cout, k, stride, k // 2, bias=True)


class _Encoder(nn.Module):
  """`create_body(resnet18, cut=-2)` with the hooks on layer2/3 outputs."""

  def __init__(self):
    super().__init__()
    self.net = _ResNet18()

  def forward(self, x):
    return self.net.features(x)  # C3, C4, C5.


class _FastaiRetinaNet(nn.Module):
  """object_detection_fastai's RetinaNet: FPN, shared subnets, `sizes` filter."""

  def __init__(self, n_classes=2, chs=128, n_anchors=5, n_conv=3, sizes=None):
    super().__init__()
    self.encoder, self.n_classes, self.sizes = _Encoder(), n_classes, sizes
    self.c5top5 = _conv(512, chs, 1)
    self.c5top6 = _conv(512, chs, 3, 2)
    self.p6top7 = nn.Sequential(nn.ReLU(), _conv(chs, chs, 3, 2))
    self.merges = nn.ModuleList([_conv(256, chs, 1), _conv(128, chs, 1)])  # C4, C3 laterals.
    self.smoothers = nn.ModuleList([_conv(chs, chs) for _ in range(3)])
    self.classifier = self._subnet(n_classes * n_anchors, chs, n_conv)
    self.box_regressor = self._subnet(4 * n_anchors, chs, n_conv)

  @staticmethod
  def _subnet(outputs, chs, n_conv):
    layers = []
    for _ in range(n_conv):
      layers += [_conv(chs, chs), nn.ReLU()]
    return nn.Sequential(*layers, _conv(chs, outputs))

  def forward(self, x):
    c3, c4, c5 = self.encoder(x)
    p = [self.c5top5(c5), self.c5top6(c5)]
    p.append(self.p6top7(p[-1]))
    for lateral, stored in zip(self.merges, (c4, c3)):
      p = [lateral(stored) + F.interpolate(p[0], stored.shape[-2:], mode="nearest")] + p
    for i, smooth in enumerate(self.smoothers):
      p[i] = smooth(p[i])
    if self.sizes is not None:
      p = [s for s in p if s.size(-1) in self.sizes]
    bs = x.size(0)
    cls = torch.cat([self.classifier(s).permute(0, 2, 3, 1).reshape(bs, -1, self.n_classes)
                     for s in p], 1)
    box = torch.cat([self.box_regressor(s).permute(0, 2, 3, 1).reshape(bs, -1, 4) for s in p], 1)
    return cls, box, [(s.size(2), s.size(3)) for s in p]


def _create_anchors(sizes, ratios=(1.0,), scales=(0.2, 0.4, 0.6, 0.8, 1.0)):
  """fastai's create_anchors: (cy, cx, h, w) in [-1, 1], flattened."""
  aspects = torch.tensor([[s * math.sqrt(r), s * math.sqrt(1 / r)]
                          for r in ratios for s in scales]).view(-1, 2)
  out = []
  for h, w in sizes:
    sized = 4 * (aspects * torch.tensor([2 / h, 2 / w])).unsqueeze(0)
    gy = torch.linspace(-1 + 1 / h, 1 - 1 / h, h) if h > 1 else torch.tensor([0.0])
    gx = torch.linspace(-1 + 1 / w, 1 - 1 / w, w) if w > 1 else torch.tensor([0.0])
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij"), -1).view(-1, 1, 2)
    n, a = grid.size(0), aspects.size(0)
    out.append(torch.cat([grid.expand(n, a, 2), sized.expand(n, a, 2)], 2).view(-1, 4))
  return torch.cat(out, 0)


def _activ_to_bbox(acts, anchors):
  acts = acts * acts.new_tensor([[0.1, 0.1, 0.2, 0.2]])
  centres = anchors[..., 2:] * acts[..., :2] + anchors[..., :2]
  sizes = anchors[..., 2:] * torch.exp(acts[..., 2:])
  boxes = torch.cat([centres, sizes], -1)
  tlbr = torch.cat([boxes[..., :2] - boxes[..., 2:] / 2, boxes[..., :2] + boxes[..., 2:] / 2], -1)
  tlbr = tlbr.clamp(-1, 1)  # process_output's clamp, in tlbr.
  return torch.cat([(tlbr[..., :2] + tlbr[..., 2:]) / 2, tlbr[..., 2:] - tlbr[..., :2]], -1)


def _t(x):
  x = np.asarray(x, np.float32)
  return torch.from_numpy(x.transpose(3, 2, 0, 1).copy() if x.ndim == 4 else x.copy())


def _copy_conv(dst: nn.Conv2d, src: nnx.Conv):
  with torch.no_grad():
    dst.weight.copy_(_t(src.kernel[...]))
    dst.bias.copy_(_t(src.bias[...]))


def _randomised(levels):
  """A Flax RetinaNet whose every weight and statistic is random (no zero heads)."""
  model = M.RetinaNet(M.RetinaNetConfig(levels=levels, build_all_levels=True), rngs=nnx.Rngs(0))
  keys = iter(jax.random.split(jax.random.key(1), 200))
  for path, v in nnx.iter_graph(model):
    if isinstance(v, (nnx.Param, nnx.BatchStat)):
      x = v.get_value()
      noise = 0.05 * jax.random.normal(next(keys), x.shape)
      # Variances stay positive; everything else moves off its initial value.
      v.set_value(jax.numpy.abs(noise) + 0.5 if path[-1] == "var" else x + noise)
  return model


def _to_torch(model, sizes):
  net = _FastaiRetinaNet(sizes=sizes).eval()
  variables = W.variables_by_name(model.body)
  state = net.encoder.net.state_dict()
  with torch.no_grad():
    for name, var in variables.items():
      state[name].copy_(_t(var.get_value()))
  fpn = model.fpn
  for dst, src in ((net.c5top5, fpn.p5_lateral), (net.c5top6, fpn.p6_conv),
                   (net.p6top7[1], fpn.p7_conv), (net.merges[0], fpn.p4_lateral),
                   (net.merges[1], fpn.p3_lateral), (net.smoothers[0], fpn.p3_smooth),
                   (net.smoothers[1], fpn.p4_smooth), (net.smoothers[2], fpn.p5_smooth)):
    _copy_conv(dst, src)
  for dst, src in ((net.classifier, model.classifier), (net.box_regressor, model.box_regressor)):
    convs = [m for m in dst if isinstance(m, nn.Conv2d)]
    for d, s in zip(convs, [*src.convs, src.out]):
      _copy_conv(d, s)
  return net


@pytest.mark.parametrize("levels,sizes", [((4,), [8]), ((3, 4, 5, 6, 7), [16, 8, 4, 2, 1])])
def test_forward_anchors_and_decoding_match_the_reference(levels, sizes):
  full = _randomised(M.ALL_LEVELS)
  model = M.RetinaNet(M.RetinaNetConfig(levels=levels, build_all_levels=True), rngs=nnx.Rngs(9))
  nnx.update(model, nnx.state(full))
  net = _to_torch(model, sizes)
  x = np.random.default_rng(0).normal(size=(2, 128, 128, 3)).astype(np.float32)
  cls, deltas = model(x, train=False)
  with torch.no_grad():
    t_cls, t_deltas, grid = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
  assert grid == [(s, s) for s in sizes]
  scale = float(np.abs(t_cls.numpy()).max())
  np.testing.assert_allclose(cls, t_cls.numpy(), atol=1e-4 * scale)
  np.testing.assert_allclose(deltas, t_deltas.numpy(), atol=1e-4 * float(t_deltas.abs().max()))
  anchors = model.anchors((128, 128))
  t_anchors = _create_anchors(grid)
  np.testing.assert_allclose(anchors, t_anchors.numpy(), atol=1e-6)
  np.testing.assert_allclose(box_lib.decode(deltas, anchors), _activ_to_bbox(t_deltas, t_anchors),
                             atol=1e-4)
  np.testing.assert_allclose(M.scores(cls), torch.sigmoid(t_cls).max(-1).values, atol=1e-5)
