"""A PyTorch peer of midog-jax's RetinaNet, for speed comparisons only.

The same network and loss as `midog_jax.model.retinanet` and `midog_jax.model.losses` (see
the project's reference notes): torchvision's ResNet18 up to layer4 (built
by hand in the same layout where torchvision is absent), the FPN for the
configured pyramid level, the shared 3-conv subnets, anchors matched at IoU
0.5 / 0.4, the reference focal loss (0.75 positives, 0.25 negatives, gamma 2,
weights without gradient) and smooth L1 on positives; AdamW. It runs
eagerly, with bf16 autocast and channels-last on request, the way a PyTorch
user runs the original.

Two differences from the original fastai code, both in PyTorch's favour: the
loss is vectorised over the batch (the original loops over images), and by
default only the FPN convolutions of the used level run, as in midog-jax
(`all_levels=True` computes P3..P7 and drops the unused ones, as the
original does).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

ANCHOR_SCALES = (0.2, 0.4, 0.6, 0.8, 1.0)
BOX_STD = (0.1, 0.1, 0.2, 0.2)


class _BasicBlock(nn.Module):
  """torchvision's BasicBlock (used only without torchvision)."""

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.downsample = nn.Sequential(
        nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
    ) if stride != 1 or cin != cout else None

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + (x if self.downsample is None else self.downsample(x)))


def _resnet18_layers() -> list[nn.Module]:
  """[conv1, bn1, relu, maxpool, layer1..layer4] of ResNet18, random weights."""
  try:
    import torchvision
    r = torchvision.models.resnet18(weights=None)
    return [r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3, r.layer4]
  except ImportError:
    layers, cin = [], 64
    for i, width in enumerate((64, 128, 256, 512)):
      stride = 1 if i == 0 else 2
      layers.append(nn.Sequential(_BasicBlock(cin, width, stride),
                                  _BasicBlock(width, width, 1)))
      cin = width
    return [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1), *layers]


def _conv(cin, cout, k=3, stride=1):
  conv = nn.Conv2d(cin, cout, k, stride, k // 2)
  nn.init.kaiming_normal_(conv.weight)
  nn.init.zeros_(conv.bias)
  return conv


def _subnet(chs, outputs, n_conv, bias):
  layers = []
  for _ in range(n_conv):
    layers += [_conv(chs, chs), nn.ReLU()]
  out = _conv(chs, outputs)
  nn.init.zeros_(out.weight)
  nn.init.constant_(out.bias, bias)
  return nn.Sequential(*layers, out)


class RetinaNet(nn.Module):
  """ResNet18 body, FPN and heads; level 4 (stride 16) feeds the heads."""

  def __init__(self, num_classes=2, chs=128, n_conv=3, all_levels=False):
    super().__init__()
    body = _resnet18_layers()
    self.stem = nn.Sequential(*body[:5])  # conv1 through layer1.
    self.layer2, self.layer3, self.layer4 = body[5:]
    self.num_classes, self.all_levels = num_classes, all_levels
    self.p5_lateral, self.p4_lateral = _conv(512, chs, 1), _conv(256, chs, 1)
    self.p4_smooth = _conv(chs, chs)
    if all_levels:  # What the original computes and then drops.
      self.p6_conv, self.p7_conv = _conv(512, chs, 3, 2), _conv(chs, chs, 3, 2)
      self.p3_lateral = _conv(128, chs, 1)
      self.p3_smooth, self.p5_smooth = _conv(chs, chs), _conv(chs, chs)
    n_anchors = len(ANCHOR_SCALES)
    self.classifier = _subnet(chs, num_classes * n_anchors, n_conv, -4.0)
    self.box_regressor = _subnet(chs, 4 * n_anchors, n_conv, 0.0)

  def forward(self, x):
    c3 = self.layer2(self.stem(x))
    c4 = self.layer3(c3)
    c5 = self.layer4(c4)
    p5 = self.p5_lateral(c5)
    p4 = self.p4_lateral(c4) + F.interpolate(p5, c4.shape[-2:], mode="nearest")
    if self.all_levels:
      p6 = self.p6_conv(c5)
      self.p7_conv(F.relu(p6))
      p3 = self.p3_lateral(c3) + F.interpolate(p4, c3.shape[-2:], mode="nearest")
      self.p3_smooth(p3), self.p5_smooth(p5)
    p4 = self.p4_smooth(p4)
    b = x.shape[0]
    cls = self.classifier(p4).permute(0, 2, 3, 1).reshape(b, -1, self.num_classes)
    box = self.box_regressor(p4).permute(0, 2, 3, 1).reshape(b, -1, 4)
    return cls.float(), box.float()


def anchors(patch: int, level: int = 4) -> torch.Tensor:
  """(cy, cx, h, w) in [-1, 1], ordered row, column, scale, as midog-jax's."""
  side = patch
  for _ in range(level):
    side = -(-side // 2)
  g = torch.linspace(-1 + 1 / side, 1 - 1 / side, side) if side > 1 else torch.zeros(1)
  centres = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 1, 2)
  sizes = torch.tensor([[4 * s * 2 / side] * 2 for s in ANCHOR_SCALES])[None]
  n, a = centres.shape[0], sizes.shape[1]
  return torch.cat([centres.expand(n, a, 2), sizes.expand(n, a, 2)], -1).reshape(-1, 4)


def _tlbr(b):
  return torch.cat([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)


def retinanet_loss(cls, box, anchor, gt_xyxy, valid, patch: int, gamma: float = 2.0,
                   positive_weight: float = 0.75) -> torch.Tensor:
  """Mean over images of (focal + box loss), as `midog_jax.model.losses`.

  cls [B, A, C], box [B, A, 4] float32; anchor [A, 4]; gt_xyxy [B, N, 4]
  pixels; valid [B, N] bool. Column 0 is the mitotic figure.
  """
  x1, y1, x2, y2 = gt_xyxy.unbind(-1)
  gt = torch.stack([(y1 + y2) / patch - 1, (x1 + x2) / patch - 1,
                    2 * (y2 - y1) / patch, 2 * (x2 - x1) / patch], -1)
  ta, tg = _tlbr(anchor)[None, :, None], _tlbr(gt)[:, None]  # [1, A, 1, 4], [B, 1, N, 4]
  sides = (torch.minimum(ta[..., 2:], tg[..., 2:]) - torch.maximum(ta[..., :2], tg[..., :2])
           ).clamp(min=0)
  inter = sides[..., 0] * sides[..., 1]
  area_a = (anchor[:, 2] * anchor[:, 3])[None, :, None]
  area_g = (gt[..., 2] * gt[..., 3])[:, None]
  iou = torch.where(valid[:, None], inter / (area_a + area_g - inter + 1e-8), 0.0)
  best, index = iou.max(-1)  # [B, A]
  positive = best > 0.5
  counted = (best < 0.4) | positive  # IoU in [0.4, 0.5]: ignored.
  num_pos = positive.sum(-1).clamp(min=1).float()

  targets = torch.zeros_like(cls)
  targets[..., 0] = positive.float()
  p = torch.sigmoid(cls)
  modulating = targets * (1 - p) + (1 - targets) * p
  alphas = targets * positive_weight + (1 - targets) * (1 - positive_weight)
  weights = (modulating ** gamma * alphas).detach()
  bce = F.binary_cross_entropy_with_logits(cls, targets, reduction="none")
  focal = (weights * bce * counted[..., None]).sum((1, 2)) / num_pos

  matched = torch.gather(gt, 1, index[..., None].expand(-1, -1, 4))  # [B, A, 4]
  a = anchor[None]
  encoded = torch.cat([(matched[..., :2] - a[..., :2]) / a[..., 2:],
                       torch.log(matched[..., 2:] / a[..., 2:] + 1e-8)], -1)
  encoded = encoded / encoded.new_tensor(BOX_STD)
  per_coord = F.smooth_l1_loss(box, encoded, reduction="none", beta=1.0)
  box_loss = (per_coord * positive[..., None]).sum((1, 2)) / (4 * num_pos)
  return (box_loss + focal).mean()


class Peer:
  """Model, optimiser, train step and forward pass on one device."""

  def __init__(self, device: str = "cpu", bf16: bool = True, channels_last: bool = True,
               patch: int = 512, all_levels: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    self.device, self.patch = torch.device(device), patch
    self.bf16, self.channels_last = bf16, channels_last
    self.model = RetinaNet(all_levels=all_levels).to(self.device)
    if channels_last:
      self.model = self.model.to(memory_format=torch.channels_last)
    self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.99),
                                       weight_decay=0.01)
    self.anchors = anchors(patch).to(self.device)

  def to_device(self, images_nhwc, gt=None, valid=None):
    """NumPy NHWC float images (and boxes) -> device tensors, NCHW view."""
    x = torch.from_numpy(images_nhwc).to(self.device).permute(0, 3, 1, 2)
    x = x.contiguous(memory_format=torch.channels_last if self.channels_last
                     else torch.contiguous_format)
    if gt is None:
      return x
    return (x, torch.from_numpy(gt).to(self.device),
            torch.from_numpy(valid).to(self.device))

  def _autocast(self):
    return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

  def train_step(self, images, gt, valid) -> torch.Tensor:
    self.model.train()
    self.optimizer.zero_grad(set_to_none=True)
    with self._autocast():
      cls, box = self.model(images)
    loss = retinanet_loss(cls, box, self.anchors, gt, valid, self.patch)
    loss.backward()
    self.optimizer.step()
    return loss.detach()

  @torch.inference_mode()
  def forward(self, images):
    self.model.eval()
    with self._autocast():
      return self.model(images)

  def synchronize(self):
    if self.device.type == "cuda":
      torch.cuda.synchronize(self.device)


def count_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())

