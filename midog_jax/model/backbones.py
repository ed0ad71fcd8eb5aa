"""The table of bodies a RetinaNet can be built on: `config.model.backbone`.

A backbone gives the FPN its three feature widths, the optimiser its layer
groups (fastai's split for discriminative rates) and the weight loader its
state-dict names and pretrained files. To add one, write its module (it
returns C3, C4, C5 at strides 8, 16, 32 from `module(x, train)`), then add a
`Backbone` entry to `BACKBONES`; see README.md, "Where to add a backbone".
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence

import jax.numpy as jnp
from flax import nnx

from midog_jax.model import resnet
from midog_jax.model import weights

DEFAULT = "resnet18"  # The reference's; runs recorded before the field existed used it.


@dataclasses.dataclass(frozen=True)
class Backbone:
  """What the detector, the optimiser and the weight loader need of a body."""
  # make(dtype=..., rngs=...) -> a module with `module(x, train) -> (C3, C4, C5)`.
  make: Callable[..., nnx.Module]
  feature_channels: tuple[int, int, int]  # Widths of C3, C4, C5.
  # Top-level children of the body in the second layer group; the rest are the first.
  late_layers: frozenset[str]
  # Variable path -> its name in the weight files (torchvision's state-dict names).
  weight_name: Callable[[Sequence[str]], str] = weights.torchvision_name
  # `model.body_weights` names of pretrained files, e.g. {"imagenet": HubFile(...)}.
  pretrained: Mapping[str, weights.HubFile] = dataclasses.field(default_factory=dict)

  def weight_shapes(self) -> dict[str, tuple[int, ...]]:
    """{file name: shape} of every body variable, without computing a weight."""
    body = nnx.eval_shape(lambda: self.make(dtype=jnp.float32, rngs=nnx.Rngs(0)))
    return weights.shapes(weights.variables_by_name(body, self.weight_name))


# torchvision's ResNet18 ImageNet-1k weights (resnet18-f37072fd.pth), as timm
# republished them under torchvision's names.
RESNET18_IMAGENET = weights.HubFile(
    repo="timm/resnet18.tv_in1k", filename="model.safetensors",
    revision="590dfdd48494d2316a8385e1ca7fbec3b9359b35")

NARROW_WIDTH = 16  # A quarter of ResNet18's: a sixteenth of its convolutions' work.

BACKBONES: dict[str, Backbone] = {
    "resnet18": Backbone(make=resnet.ResNet18, feature_channels=resnet.FEATURE_CHANNELS,
                         late_layers=resnet.LATE_LAYERS,
                         pretrained={weights.IMAGENET: RESNET18_IMAGENET}),
    # The same network at a quarter of the width, without pretrained weights: for the
    # tests and quick trials on a CPU (with e.g. model.channels=32), never the paper's.
    "resnet18_narrow": Backbone(make=functools.partial(resnet.ResNet18, width=NARROW_WIDTH),
                                feature_channels=resnet.feature_channels(NARROW_WIDTH),
                                late_layers=resnet.LATE_LAYERS),
}


def get(name: str | None) -> Backbone:
  """The backbone `name` (None: the default); an unknown name lists the known ones."""
  name = name or DEFAULT
  if name not in BACKBONES:
    raise ValueError(f"model.backbone {name!r}: expected one of {sorted(BACKBONES)} "
                     "(add a backbone to midog_jax/model/backbones.py)")
  return BACKBONES[name]
