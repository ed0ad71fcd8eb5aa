"""ImageNet weights for the body: fetch them, or convert a torchvision checkpoint.

    python -m midog_jax.weights fetch            # into the Hugging Face cache; prints the path
    python -m midog_jax.weights convert \\
        --torchvision resnet18-f37072fd.pth --out resnet18_imagenet.npz

`fetch` downloads torchvision's ResNet18 ImageNet weights at a pinned
revision and checks every name and shape. `convert` writes an .npz keyed by
torchvision's state-dict names (without `fc.*` and `num_batches_tracked`),
kernels already in HWIO; PyTorch is only imported by that command. Training
takes either file (`--config.model.body_weights=PATH`).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from midog_jax import commands
from midog_jax import console

# JAX, Flax and the model are imported after parsing, so that `--help` answers at once.


def main(argv: Sequence[str] | None = None) -> int:
  console.quiet_startup()
  parser = argparse.ArgumentParser(prog="python -m midog_jax.weights",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--backbone", default="resnet18", help="the body (config.model.backbone)")
  commands = parser.add_subparsers(dest="command", required=True)
  convert = commands.add_parser(
      "convert", help="torchvision ResNet18 checkpoint -> .npz")
  convert.add_argument("--torchvision", required=True,
                       help="path of resnet18-f37072fd.pth")
  convert.add_argument("--out", required=True, help="output .npz path")
  commands.add_parser("fetch", help="download the ImageNet weights into the Hugging Face cache")
  args = parser.parse_args(argv)
  with console.logging_to_stderr():
    return _run(args)


def convert_torchvision(checkpoint: str, out: str, backbone: str = "resnet18") -> None:
  """Converts a torchvision .pth into an .npz of body arrays."""
  import torch  # Only this command needs PyTorch.

  from midog_jax.model import backbones
  from midog_jax.model import weights
  if not os.path.exists(checkpoint):
    raise FileNotFoundError(f"no torchvision checkpoint at {checkpoint}")
  state = torch.load(checkpoint, map_location="cpu", weights_only=True)
  arrays = weights.convert_state_dict(
      {k: v.detach().cpu().numpy() for k, v in state.items()},
      backbones.get(backbone).weight_shapes(), checkpoint, f"the {backbone} body")
  weights.write_npz(out, arrays)


def _run(args: argparse.Namespace) -> int:
  from midog_jax.model import backbones
  from midog_jax.model import weights
  try:
    backbone = backbones.get(args.backbone)
    if args.command == "convert":
      convert_torchvision(args.torchvision, args.out, args.backbone)
      print(f"wrote {args.out}")
      return 0
    path = weights.resolve(weights.IMAGENET, backbone.pretrained)
    weights.read_arrays(path, backbone.weight_shapes())  # Every name and shape.
  except (weights.WeightsError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(commands.guard(main))
