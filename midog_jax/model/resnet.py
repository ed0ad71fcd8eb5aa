"""torchvision's ResNet18 up to layer4, the reference's body.

Attribute names follow torchvision's, so its state-dict names map onto our
variables one to one (`weights.torchvision_name`). `width` (64 in
torchvision) scales every layer: a narrower body is the same network, for
tests and quick trials.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from midog_jax.model.layers import KAIMING_OUT, BatchNorm, conv

WIDTH = 64  # torchvision's: channels of the stem and layer1; layers 2-4 double it each.
FEATURE_CHANNELS = (2 * WIDTH, 4 * WIDTH, 8 * WIDTH)  # C3, C4, C5.


def feature_channels(width: int = WIDTH) -> tuple[int, int, int]:
  """Widths of C3, C4, C5 of a ResNet18 of stem width `width`."""
  return 2 * width, 4 * width, 8 * width
# fastai's split of a ResNet body for discriminative rates: layer3 and layer4
# form the second group, the stem to layer2 the first.
LATE_LAYERS = frozenset({"layer3", "layer4"})


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

  def __init__(self, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs, width: int = WIDTH):
    self.dtype = dtype
    self.conv1 = conv(3, width, 7, 2, bias=False, init=KAIMING_OUT, dtype=dtype,
                      rngs=rngs)
    self.bn1 = BatchNorm(width, dtype=dtype)
    widths, cin = (width, 2 * width, 4 * width, 8 * width), width
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
