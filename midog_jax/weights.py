"""ImageNet weights for the ResNet18 body, converted from torchvision.

    python -m midog_jax.weights convert \\
        --torchvision resnet18-f37072fd.pth --out resnet18_imagenet.npz

writes an .npz keyed by torchvision's state-dict names (without `fc.*` and
`num_batches_tracked`), convolution kernels already in HWIO. PyTorch is only
imported by that command. `load_body_weights` puts such a file into a model.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from midog_jax import model as model_lib

# Our variable name -> torchvision's suffix.
_SUFFIX = {"kernel": "weight", "scale": "weight", "bias": "bias",
           "mean": "running_mean", "var": "running_var"}
_DROPPED_SUFFIXES = ("num_batches_tracked",)
_DROPPED_PREFIXES = ("fc.",)


class WeightsError(ValueError):
  """A weights file does not fit the body."""


def _body(module: nnx.Module) -> model_lib.ResNet18:
  return module.body if isinstance(module, model_lib.RetinaNet) else module


def body_variables(module: nnx.Module) -> dict[str, nnx.Variable]:
  """The body's variables by torchvision name, e.g. `layer1.0.bn1.weight`."""
  out = {}
  for path, node in nnx.iter_graph(_body(module)):
    if isinstance(node, (nnx.Param, nnx.BatchStat)):
      *parents, leaf = (str(p) for p in path)
      out[".".join([*parents, _SUFFIX[leaf]])] = node
  return out


def _expected_shapes() -> dict[str, tuple[int, ...]]:
  body = nnx.eval_shape(lambda: model_lib.ResNet18(rngs=nnx.Rngs(0)))
  return _shapes(body_variables(body))


def _shapes(variables: Mapping[str, nnx.Variable]
            ) -> dict[str, tuple[int, ...]]:
  return {k: tuple(v.get_value().shape) for k, v in variables.items()}


def _check(arrays: Mapping[str, np.ndarray],
           expected: Mapping[str, tuple[int, ...]], source: str) -> None:
  """Raises WeightsError listing missing, unexpected and mis-shaped keys."""
  missing = sorted(set(expected) - set(arrays))
  unexpected = sorted(set(arrays) - set(expected))
  mismatched = sorted(
      f"{k}: file {tuple(arrays[k].shape)}, body {expected[k]}"
      for k in set(arrays) & set(expected)
      if tuple(arrays[k].shape) != expected[k])
  if missing or unexpected or mismatched:
    lines = [f"{source} does not fit the ResNet18 body:"]
    for title, keys in (("missing", missing), ("unexpected", unexpected),
                        ("shape mismatch", mismatched)):
      if keys:
        lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys))
    raise WeightsError("\n".join(lines))


def convert_state_dict(state: Mapping[str, np.ndarray],
                       source: str = "state dict") -> dict[str, np.ndarray]:
  """torchvision ResNet18 state dict (NumPy arrays) -> body arrays."""
  out = {}
  for name, value in state.items():
    if name.startswith(_DROPPED_PREFIXES) or name.endswith(_DROPPED_SUFFIXES):
      continue
    value = np.asarray(value, np.float32)
    # OIHW -> HWIO.
    out[name] = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
  _check(out, _expected_shapes(), source)
  return out


def convert_torchvision(checkpoint: str, out: str) -> None:
  """Converts a torchvision ResNet18 .pth into an .npz of body arrays."""
  import torch  # Only this command needs PyTorch.
  if not os.path.exists(checkpoint):
    raise FileNotFoundError(f"no torchvision checkpoint at {checkpoint}")
  state = torch.load(checkpoint, map_location="cpu", weights_only=True)
  arrays = convert_state_dict(
      {k: v.detach().cpu().numpy() for k, v in state.items()}, checkpoint)
  np.savez(out, **arrays)


def load_body_weights(module: nnx.Module, path: str) -> None:
  """Loads an .npz written by `convert` into the body of `module` in place."""
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"body weights file {path} not found; create it with `python -m "
        "midog_jax.weights convert --torchvision resnet18-f37072fd.pth "
        f"--out {path}`")
  with np.load(path) as data:
    arrays = {k: data[k] for k in data.files}
  variables = body_variables(module)
  _check(arrays, _shapes(variables), path)
  for name, var in variables.items():
    var.set_value(jnp.asarray(arrays[name], var.get_value().dtype))


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m midog_jax.weights")
  commands = parser.add_subparsers(dest="command", required=True)
  convert = commands.add_parser(
      "convert", help="torchvision ResNet18 checkpoint -> .npz")
  convert.add_argument("--torchvision", required=True,
                       help="path of resnet18-f37072fd.pth")
  convert.add_argument("--out", required=True, help="output .npz path")
  args = parser.parse_args(argv)
  if args.command == "convert":
    convert_torchvision(args.torchvision, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
