"""torchvision ResNet18 weights -> the Flax body, checked feature by feature."""

import numpy as np
import pytest
from flax import nnx

from midog_jax import model as M
from midog_jax import weights as W

torch = pytest.importorskip("torch")
nn = torch.nn


class _BasicBlock(nn.Module):
  """torchvision.models.resnet.BasicBlock, with its attribute names."""

  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.downsample = None
    if stride != 1 or cin != cout:
      self.downsample = nn.Sequential(
          nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    return self.relu(self.bn2(self.conv2(out)) + identity)


class _ResNet18(nn.Module):
  """torchvision.models.resnet18's layout and state-dict names."""

  def __init__(self):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    cin = 64
    for i, width in enumerate((64, 128, 256, 512)):
      stride = 1 if i == 0 else 2
      setattr(self, f"layer{i + 1}", nn.Sequential(
          _BasicBlock(cin, width, stride), _BasicBlock(width, width, 1)))
      cin = width
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(512, 1000)

  def features(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    c2 = self.layer2(self.layer1(x))
    c3 = self.layer3(c2)
    return c2, c3, self.layer4(c3)


@pytest.fixture(scope="module")
def torch_checkpoint(tmp_path_factory):
  torch.manual_seed(0)
  net = _ResNet18()
  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, nn.BatchNorm2d):
        n = module.num_features
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0, 0.2)
        module.running_mean.normal_(0, 0.2)
        module.running_var.uniform_(0.5, 2.0)
        module.num_batches_tracked.fill_(7)
        assert module.running_var.shape == (n,)
  net.eval()
  path = tmp_path_factory.mktemp("tv") / "resnet18-test.pth"
  torch.save(net.state_dict(), path)
  return net, path


def test_converted_body_matches_torch_features(torch_checkpoint, tmp_path):
  net, path = torch_checkpoint
  out = tmp_path / "resnet18_imagenet.npz"
  W.main(["convert", "--torchvision", str(path), "--out", str(out)])
  with np.load(out) as data:
    assert not any(k.startswith("fc.") or k.endswith("num_batches_tracked")
                   for k in data.files)
    assert data["layer1.0.conv1.weight"].shape == (3, 3, 64, 64)  # HWIO

  model = M.build_model(M.RetinaNetConfig(body_weights=str(out)), seed=3)
  x = np.random.default_rng(0).normal(size=(2, 3, 96, 64)).astype(np.float32)
  with torch.no_grad():
    expected = [t.numpy().transpose(0, 2, 3, 1)
                for t in net.features(torch.from_numpy(x))]
  got = model.body(x.transpose(0, 2, 3, 1), train=False)
  for name, g, e in zip(("C3", "C4", "C5"), got, expected):
    assert g.shape == e.shape, name
    # Relative to the feature map's scale: elementwise ratios blow up at 0.
    rel = np.max(np.abs(np.asarray(g) - e)) / np.max(np.abs(e))
    assert rel < 1e-4, (name, rel)


def test_loader_reports_offending_keys(torch_checkpoint, tmp_path):
  _, path = torch_checkpoint
  good = tmp_path / "good.npz"
  W.convert_torchvision(str(path), str(good))
  with np.load(good) as data:
    arrays = {k: data[k] for k in data.files}
  arrays.pop("layer2.0.downsample.1.running_var")
  arrays["layer5.0.conv1.weight"] = np.zeros((3, 3, 1, 1), np.float32)
  arrays["bn1.weight"] = np.ones((65,), np.float32)
  bad = tmp_path / "bad.npz"
  np.savez(bad, **arrays)

  model = nnx.eval_shape(lambda: M.RetinaNet(rngs=nnx.Rngs(0)))
  with pytest.raises(W.WeightsError) as err:
    W.load_body_weights(model, str(bad))
  message = str(err.value)
  assert str(bad) in message
  assert "missing (1): layer2.0.downsample.1.running_var" in message
  assert "unexpected (1): layer5.0.conv1.weight" in message
  assert "bn1.weight: file (65,), body (64,)" in message

  missing = tmp_path / "nowhere.npz"
  with pytest.raises(FileNotFoundError, match=str(missing)):
    W.load_body_weights(model, str(missing))


def test_converter_rejects_foreign_checkpoints():
  state = {"conv1.weight": np.zeros((64, 3, 7, 7), np.float32),
           "fc.weight": np.zeros((1000, 512), np.float32),
           "encoder.extra": np.zeros((2,), np.float32)}
  with pytest.raises(W.WeightsError) as err:
    W.convert_state_dict(state, "foreign.pth")
  message = str(err.value)
  assert "foreign.pth" in message and "encoder.extra" in message
  assert "layer4.1.bn2.running_mean" in message  # among the missing
