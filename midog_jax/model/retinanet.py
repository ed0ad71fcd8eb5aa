"""The reference RetinaNet in Flax NNX: a body from `backbones`, FPN and head subnets.

The reference's body is ResNet18 (`config.model.backbone`). Layout is NHWC. Parameters and BatchNorm statistics are float32; `dtype`
sets the compute precision (float32 on CPU, bfloat16 on accelerators). The
pyramid levels that feed the heads are a setting; only the FPN convolutions
those levels need are built and run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from midog_jax import sharding
from midog_jax.model import backbones
from midog_jax.model import boxes as box_lib
from midog_jax.model import weights
from midog_jax.model.layers import KAIMING_IN, conv

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
  backbone: str = backbones.DEFAULT  # A key of `backbones.BACKBONES`.

  @property
  def num_anchors(self) -> int:
    return len(self.anchor_scales) * len(box_lib.ANCHOR_RATIOS)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict,
                  pretrained: bool = True) -> "RetinaNetConfig":
    """The network of a run's `config`; `pretrained=False` leaves out the body
    weights (a resumed or loaded run restores every weight from its checkpoint)."""
    m = config.model
    return cls(levels=tuple(m.levels), num_classes=m.num_classes, dtype=m.dtype,
               body_weights=m.body_weights if pretrained else None,
               backbone=m.get("backbone", backbones.DEFAULT),
               channels=m.get("channels", cls.channels))


def _upsample2(x: jax.Array) -> jax.Array:
  """Nearest-neighbour x2 upsampling, NHWC."""
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
  return x.reshape(b, 2 * h, 2 * w, c)


class FPN(nnx.Module):
  """The reference's feature pyramid, built for the levels it must serve."""

  def __init__(self, levels: Sequence[int], channels: int,
               feature_channels: tuple[int, int, int], *, build_all: bool,
               dtype: jnp.dtype, rngs: nnx.Rngs):
    built = set(ALL_LEVELS if build_all else levels)
    lowest = min(built)
    kw = dict(bias=True, init=KAIMING_IN, dtype=dtype, rngs=rngs)
    c3, c4, c5 = feature_channels
    # P5 feeds P4 and P3 through the top-down path.
    self.p5_lateral = conv(c5, channels, 1, **kw) if lowest <= 5 else None
    self.p6_conv = conv(c5, channels, 3, 2, **kw) if built & {6, 7} else None
    self.p7_conv = conv(channels, channels, 3, 2, **kw) if 7 in built else None
    self.p4_lateral = conv(c4, channels, 1, **kw) if lowest <= 4 else None
    self.p3_lateral = conv(c3, channels, 1, **kw) if lowest <= 3 else None
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
    backbone = backbones.get(config.backbone)
    self.body = backbone.make(dtype=dtype, rngs=rngs)
    self.fpn = FPN(levels, config.channels, backbone.feature_channels,
                   build_all=config.build_all_levels, dtype=dtype, rngs=rngs)
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
  """A RetinaNet, with the body's pretrained weights if the config names them."""
  model = RetinaNet(config, rngs=nnx.Rngs(seed))
  backbone = backbones.get(config.backbone)
  path = weights.resolve(config.body_weights, backbone.pretrained)
  if path:
    weights.load_into(weights.variables_by_name(model.body, backbone.weight_name), path,
                      f"the {config.backbone} body")
  return model


def scores(cls_logits: jax.Array) -> jax.Array:
  """Detection score per anchor: max over class columns of the sigmoid."""
  return jnp.max(jax.nn.sigmoid(cls_logits), axis=-1)


def make_forward(graphdef: nnx.GraphDef, mesh: Mesh | None = None
                 ) -> Callable[[nnx.State, nnx.State, jax.Array],
                               tuple[jax.Array, jax.Array]]:
  """A jitted eval-mode `forward(params, batch_stats, images)`.

  Returns class logits [B, A, C] and box deltas [B, A, 4] (float32), with
  anchors as `model.anchors(image_hw)`.
  """

  def forward(params: nnx.State, batch_stats: nnx.State, images: jax.Array):
    model = nnx.merge(graphdef, params, batch_stats)
    return model(images, train=False)

  return sharding.jit_data_parallel(forward, mesh, 2, 1, lambda rep, dat: (dat, dat))
