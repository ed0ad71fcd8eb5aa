"""torchvision ResNet18 weights -> the Flax body, checked feature by feature."""

import numpy as np
import pytest
from flax import nnx

from midog_jax import weights as W
from midog_jax.model import retinanet as M
from midog_jax.model import backbones
from midog_jax.model import weights

torch = pytest.importorskip("torch")
RESNET18 = backbones.get("resnet18")
HUB_FILE = RESNET18.pretrained[weights.IMAGENET]
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
  body = weights.variables_by_name(model.body)
  with pytest.raises(weights.WeightsError) as err:
    weights.load_into(body, str(bad))
  message = str(err.value)
  assert str(bad) in message
  assert "missing (1): layer2.0.downsample.1.running_var" in message
  assert "unexpected (1): layer5.0.conv1.weight" in message
  assert "bn1.weight: file (65,), body (64,)" in message

  missing = tmp_path / "nowhere.npz"
  with pytest.raises(FileNotFoundError, match=str(missing)):
    weights.load_into(body, str(missing))


def test_converter_rejects_foreign_checkpoints():
  state = {"conv1.weight": np.zeros((64, 3, 7, 7), np.float32),
           "fc.weight": np.zeros((1000, 512), np.float32),
           "encoder.extra": np.zeros((2,), np.float32)}
  with pytest.raises(weights.WeightsError) as err:
    weights.convert_state_dict(state, RESNET18.weight_shapes(), "foreign.pth")
  message = str(err.value)
  assert "foreign.pth" in message and "encoder.extra" in message
  assert "layer4.1.bn2.running_mean" in message  # among the missing


# --- The default: torchvision's weights from the hub's cache, as safetensors. ---

def _safetensors_of(net, path):
  from safetensors.numpy import save_file
  save_file({k: v.detach().cpu().numpy() for k, v in net.state_dict().items()}, str(path))
  return path


def _hub_cache(root, blob_bytes, blob_name=None):
  """A Hugging Face cache laid out as hf_hub_download leaves it, for the
  pinned revision (no network involved)."""
  import hashlib
  repo = root / ("models--" + HUB_FILE.repo.replace("/", "--"))
  name = blob_name or hashlib.sha256(blob_bytes).hexdigest()
  (repo / "blobs").mkdir(parents=True)
  (repo / "blobs" / name).write_bytes(blob_bytes)
  snap = repo / "snapshots" / HUB_FILE.revision
  snap.mkdir(parents=True)
  (snap / HUB_FILE.filename).symlink_to(repo / "blobs" / name)
  return root


def _body_state(model):
  return {k: np.asarray(v.get_value()) for k, v in weights.variables_by_name(model.body).items()}


def test_safetensors_and_converter_give_identical_bodies(torch_checkpoint, tmp_path):
  net, pth = torch_checkpoint
  npz = tmp_path / "converted.npz"
  W.convert_torchvision(str(pth), str(npz))
  st = _safetensors_of(net, tmp_path / "model.safetensors")
  a = _body_state(M.build_model(M.RetinaNetConfig(body_weights=str(npz)), seed=1))
  b = _body_state(M.build_model(M.RetinaNetConfig(body_weights=str(st)), seed=2))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  scratch = _body_state(M.build_model(M.RetinaNetConfig(body_weights="none"), seed=1))
  assert not np.array_equal(scratch["conv1.weight"], a["conv1.weight"])


def test_default_config_takes_imagenet_weights_from_the_hub_cache(torch_checkpoint, tmp_path,
                                                                   monkeypatch):
  from huggingface_hub import constants
  from configs import default
  net, pth = torch_checkpoint
  st = _safetensors_of(net, tmp_path / "model.safetensors")
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(_hub_cache(tmp_path / "hub", st.read_bytes())))
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # Never the network in tests.
  config = default.get_config()
  assert config.model.body_weights == weights.IMAGENET
  model = M.build_model(M.RetinaNetConfig.from_config(config), seed=5)
  expected = _body_state(M.build_model(M.RetinaNetConfig(body_weights=str(st)), seed=0))
  for k, v in _body_state(model).items():
    np.testing.assert_array_equal(v, expected[k], err_msg=k)
  # A resumed run restores every weight from its checkpoint: nothing fetched.
  assert M.RetinaNetConfig.from_config(config, pretrained=False).body_weights is None


def test_a_corrupt_cached_file_is_refused(torch_checkpoint, tmp_path, monkeypatch):
  from huggingface_hub import constants
  net, _ = torch_checkpoint
  data = _safetensors_of(net, tmp_path / "model.safetensors").read_bytes()
  cache = _hub_cache(tmp_path / "hub", data[:-10] + b"0" * 10, blob_name="a" * 64)
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  with pytest.raises(weights.WeightsError, match="differs from the hub's a{64}; delete it"):
    weights.resolve(weights.IMAGENET, RESNET18.pretrained)


@pytest.mark.parametrize("offline_flag", [True, False])
def test_offline_without_a_cached_copy_is_one_line_with_the_remedy(tmp_path, monkeypatch,
                                                                    offline_flag):
  import socket
  import time
  from huggingface_hub import constants
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline_flag)
  with socket.socket() as s:  # Nothing listens there: as a machine without internet.
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
  monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
  t = time.perf_counter()
  with pytest.raises(weights.WeightsError) as e:
    weights.resolve(weights.IMAGENET, RESNET18.pretrained)
  assert time.perf_counter() - t < 60
  message = str(e.value)
  assert "\n" not in message and HUB_FILE.url in message
  assert "--config.model.body_weights=PATH" in message and "body_weights=none" in message
