"""The reference RetinaNet in Flax NNX: ResNet18 body, FPN and head subnets.

Layout is NHWC. Parameters and BatchNorm statistics are float32; `dtype`
sets the compute precision (float32 on CPU, bfloat16 on accelerators). The
pyramid levels that feed the heads are a setting; only the FPN convolutions
those levels need are built and run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from midog_jax import boxes as box_lib

Initializer = nnx.initializers.Initializer

# Kaiming-normal as torch's `kaiming_normal_` (untruncated normal): fan-in
# for the FPN and heads (fastai's conv2d), fan-out for the body (torchvision).
KAIMING_IN = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")
KAIMING_OUT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
ALL_LEVELS = (3, 4, 5, 6, 7)


@dataclasses.dataclass(frozen=True)
class RetinaNetConfig:
  """What varies between RetinaNet builds."""
  levels: tuple[int, ...] = (4,)  # Level 4 = stride 16 (`sizes=[32]` at 512).
  num_classes: int = 2  # Column 0 mitotic figure, column 1 never positive.
  anchor_scales: tuple[float, ...] = box_lib.ANCHOR_SCALES
  channels: int = 128
  head_convs: int = 3
  class_bias: float = -4.0
  dtype: str = "float32"  # Compute dtype, e.g. "bfloat16" on accelerators.
  build_all_levels: bool = False  # Build P3..P7 convs even if unused.
  # "imagenet" (torchvision's, fetched), a .safetensors/.npz path, or None/"none".
  body_weights: str | None = None

  @property
  def num_anchors(self) -> int:
    return len(self.anchor_scales) * len(box_lib.ANCHOR_RATIOS)


def _pad(k: int) -> tuple[tuple[int, int], tuple[int, int]]:
  # Torch pads symmetrically; "SAME" would pad stride-2 convs asymmetrically.
  return ((k // 2, k // 2), (k // 2, k // 2))


def conv(cin: int, cout: int, k: int, stride: int = 1, *, bias: bool,
         init: Initializer, dtype: jnp.dtype, rngs: nnx.Rngs,
         bias_init: Initializer = nnx.initializers.zeros) -> nnx.Conv:
  """A k x k convolution padded like torch's `padding=k // 2`."""
  return nnx.Conv(cin, cout, (k, k), (stride, stride), padding=_pad(k),
                  use_bias=bias, kernel_init=init, bias_init=bias_init,
                  dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


class BatchNorm(nnx.Module):
  """BatchNorm with torch semantics (momentum 0.1, unbiased running var).

  Statistics and the folded scale/shift are float32; the output is in the
  compute dtype.
  """

  def __init__(self, features: int, *, eps: float = 1e-5,
               momentum: float = 0.1, dtype: jnp.dtype = jnp.float32):
    self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((features,), jnp.float32))
    self.eps, self.momentum, self.dtype = eps, momentum, dtype

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    xf = x.astype(jnp.float32)
    if train:
      axes = tuple(range(x.ndim - 1))
      mean = xf.mean(axes)
      var = jnp.maximum(jnp.square(xf).mean(axes) - jnp.square(mean), 0.0)
      n = x.size // x.shape[-1]
      m = self.momentum
      self.mean[...] = jax.lax.stop_gradient(
          (1 - m) * self.mean[...] + m * mean)
      self.var[...] = jax.lax.stop_gradient(
          (1 - m) * self.var[...] + m * var * (n / max(n - 1, 1)))
    else:
      mean, var = self.mean[...], self.var[...]
    mul = self.scale[...] * jax.lax.rsqrt(var + self.eps)
    return (xf * mul + (self.bias[...] - mean * mul)).astype(self.dtype)


class BasicBlock(nnx.Module):
  """torchvision's BasicBlock (expansion 1)."""

  def __init__(self, cin: int, cout: int, stride: int, *, dtype: jnp.dtype,
               rngs: nnx.Rngs):
    kw = dict(bias=False, init=KAIMING_OUT, dtype=dtype, rngs=rngs)
    self.conv1 = conv(cin, cout, 3, stride, **kw)
    self.bn1 = BatchNorm(cout, dtype=dtype)
    self.conv2 = conv(cout, cout, 3, 1, **kw)
    self.bn2 = BatchNorm(cout, dtype=dtype)
    needs_projection = stride != 1 or cin != cout
    self.downsample = nnx.List([conv(cin, cout, 1, stride, **kw),
                                BatchNorm(cout, dtype=dtype)]
                               ) if needs_projection else None

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = jax.nn.relu(self.bn1(self.conv1(x), train))
    y = self.bn2(self.conv2(y), train)
    if self.downsample is not None:
      x = self.downsample[1](self.downsample[0](x), train)
    return jax.nn.relu(y + x)


class ResNet18(nnx.Module):
  """ResNet18 up to layer4; attribute names follow torchvision's."""

  def __init__(self, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    self.conv1 = conv(3, 64, 7, 2, bias=False, init=KAIMING_OUT, dtype=dtype,
                      rngs=rngs)
    self.bn1 = BatchNorm(64, dtype=dtype)
    widths, cin = (64, 128, 256, 512), 64
    for i, width in enumerate(widths):
      stride = 1 if i == 0 else 2
      blocks = nnx.List([BasicBlock(cin, width, stride, dtype=dtype, rngs=rngs),
                         BasicBlock(width, width, 1, dtype=dtype, rngs=rngs)])
      setattr(self, f"layer{i + 1}", blocks)
      cin = width

  def __call__(self, x: jax.Array, train: bool = False
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns C3, C4, C5 (outputs of layer2, layer3, layer4)."""
    x = jax.nn.relu(self.bn1(self.conv1(x.astype(self.dtype)), train))
    x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max,
                              (1, 3, 3, 1), (1, 2, 2, 1),
                              ((0, 0), (1, 1), (1, 1), (0, 0)))
    features = []
    for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
      for block in layer:
        x = block(x, train)
      features.append(x)
    return features[1], features[2], features[3]


def _upsample2(x: jax.Array) -> jax.Array:
  """Nearest-neighbour x2 upsampling, NHWC."""
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
  return x.reshape(b, 2 * h, 2 * w, c)


class FPN(nnx.Module):
  """The reference's feature pyramid, built for the levels it must serve."""

  def __init__(self, levels: Sequence[int], channels: int, *, build_all: bool,
               dtype: jnp.dtype, rngs: nnx.Rngs):
    built = set(ALL_LEVELS if build_all else levels)
    lowest = min(built)
    kw = dict(bias=True, init=KAIMING_IN, dtype=dtype, rngs=rngs)
    # P5 feeds P4 and P3 through the top-down path.
    self.p5_lateral = conv(512, channels, 1, **kw) if lowest <= 5 else None
    self.p6_conv = conv(512, channels, 3, 2, **kw) if built & {6, 7} else None
    self.p7_conv = conv(channels, channels, 3, 2, **kw) if 7 in built else None
    self.p4_lateral = conv(256, channels, 1, **kw) if lowest <= 4 else None
    self.p3_lateral = conv(128, channels, 1, **kw) if lowest <= 3 else None
    self.p3_smooth = conv(channels, channels, 3, **kw) if 3 in built else None
    self.p4_smooth = conv(channels, channels, 3, **kw) if 4 in built else None
    self.p5_smooth = conv(channels, channels, 3, **kw) if 5 in built else None

  def __call__(self, c3: jax.Array, c4: jax.Array, c5: jax.Array,
               levels: Sequence[int]) -> list[jax.Array]:
    """The P-maps of `levels`, in the order given."""
    want, lowest = set(levels), min(levels)
    out: dict[int, jax.Array] = {}
    if want & {6, 7}:
      out[6] = self.p6_conv(c5)
      if 7 in want:
        out[7] = self.p7_conv(jax.nn.relu(out[6]))
    if lowest <= 5:
      p5 = self.p5_lateral(c5)
      out[5] = self.p5_smooth(p5) if 5 in want else p5
      if lowest <= 4:
        p4 = self.p4_lateral(c4) + _upsample2(p5)
        out[4] = self.p4_smooth(p4) if 4 in want else p4
        if lowest <= 3:
          p3 = self.p3_lateral(c3) + _upsample2(p4)
          out[3] = self.p3_smooth(p3)
    return [out[level] for level in levels]


class Head(nnx.Module):
  """A subnet: `n_conv` x (3x3 conv + ReLU), then a zero-weight 3x3 conv."""

  def __init__(self, channels: int, outputs: int, n_conv: int,
               final_bias: float, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.convs = nnx.List([
        conv(channels, channels, 3, bias=True, init=KAIMING_IN, dtype=dtype,
             rngs=rngs) for _ in range(n_conv)])
    self.out = conv(channels, outputs, 3, bias=True,
                    init=nnx.initializers.zeros, dtype=dtype, rngs=rngs,
                    bias_init=nnx.initializers.constant(final_bias))

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in self.convs:
      x = jax.nn.relu(layer(x))
    return self.out(x)


class RetinaNet(nnx.Module):
  """Body + FPN + shared heads over the configured pyramid levels."""

  def __init__(self, config: RetinaNetConfig = RetinaNetConfig(), *,
               rngs: nnx.Rngs):
    levels = tuple(config.levels)
    if not levels or any(level not in ALL_LEVELS for level in levels):
      raise ValueError(f"levels must be among {ALL_LEVELS}, got {levels}")
    dtype = jnp.dtype(config.dtype)
    self.config = config
    self.levels = levels
    self.body = ResNet18(dtype=dtype, rngs=rngs)
    self.fpn = FPN(levels, config.channels, build_all=config.build_all_levels,
                   dtype=dtype, rngs=rngs)
    a = config.num_anchors
    self.classifier = Head(config.channels, a * config.num_classes,
                           config.head_convs, config.class_bias, dtype=dtype,
                           rngs=rngs)
    self.box_regressor = Head(config.channels, a * 4, config.head_convs, 0.0,
                              dtype=dtype, rngs=rngs)

  def __call__(self, images: jax.Array, train: bool = False
               ) -> tuple[jax.Array, jax.Array]:
    """images [B, H, W, 3] -> class logits [B, A, C], box deltas [B, A, 4].

    Anchors are ordered as `boxes.anchor_grid(image_hw, self.levels)`;
    outputs are float32 whatever the compute dtype.
    """
    c3, c4, c5 = self.body(images, train)
    maps = self.fpn(c3, c4, c5, self.levels)
    b, c = images.shape[0], self.config.num_classes
    cls = [self.classifier(p).reshape(b, -1, c) for p in maps]
    box = [self.box_regressor(p).reshape(b, -1, 4) for p in maps]
    return (jnp.concatenate(cls, 1).astype(jnp.float32),
            jnp.concatenate(box, 1).astype(jnp.float32))

  def anchors(self, image_hw: Sequence[int]):
    """Anchors matching this model's outputs at the given patch size."""
    return box_lib.anchor_grid(image_hw, self.levels,
                               self.config.anchor_scales)


def count_params(module: nnx.Module) -> int:
  """Number of trainable parameters (BatchNorm statistics excluded)."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def build_model(config: RetinaNetConfig = RetinaNetConfig(),
                seed: int = 0) -> RetinaNet:
  """A RetinaNet, with the body's ImageNet weights if the config names them."""
  model = RetinaNet(config, rngs=nnx.Rngs(seed))
  from midog_jax import weights  # Imported here: weights imports this module.
  path = weights.resolve(config.body_weights)
  if path:
    weights.load_body_weights(model, path)
  return model
