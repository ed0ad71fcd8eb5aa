"""ImageNet weights for the ResNet18 body: torchvision's, as the reference.

The reference builds its body with `create_body(models.resnet18, True, -2)`:
torchvision's ImageNet-1k weights. `body_weights="imagenet"` (the default
of configs/default.py) fetches the same weights without PyTorch: timm's
`resnet18.tv_in1k` repository on the Hugging Face Hub holds torchvision's
original weights in safetensors format under torchvision's parameter names.
The file is downloaded once at a pinned revision into the hub's cache,
checked against the hub's sha256 and against every expected key and shape.

    python -m midog_jax.weights fetch            # into the cache; prints the path
    python -m midog_jax.weights convert \\
        --torchvision resnet18-f37072fd.pth --out resnet18_imagenet.npz

`convert` writes an .npz keyed by torchvision's state-dict names (without
`fc.*` and `num_batches_tracked`), kernels already in HWIO; PyTorch is only
imported by that command. `load_body_weights` takes either file.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import socket
import sys
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from midog_jax import cli

if TYPE_CHECKING:
  from flax import nnx

  from midog_jax import model as model_lib

# JAX, Flax and the model are imported where used, so that `--help` answers at once.

# Our variable name -> torchvision's suffix.
_SUFFIX = {"kernel": "weight", "scale": "weight", "bias": "bias",
           "mean": "running_mean", "var": "running_var"}
_DROPPED_SUFFIXES = ("num_batches_tracked",)
_DROPPED_PREFIXES = ("fc.",)

IMAGENET = "imagenet"  # `model.body_weights` value: fetch torchvision's weights.
SCRATCH = ("", "none")  # `model.body_weights` values for random initialisation.
IMAGENET_REPO = "timm/resnet18.tv_in1k"
IMAGENET_FILE = "model.safetensors"
IMAGENET_REVISION = "590dfdd48494d2316a8385e1ca7fbec3b9359b35"
IMAGENET_URL = (f"https://huggingface.co/{IMAGENET_REPO}/resolve/{IMAGENET_REVISION}/"
                f"{IMAGENET_FILE}")


class WeightsError(ValueError):
  """A weights file does not fit the body."""


def _body(module: nnx.Module) -> model_lib.ResNet18:
  from midog_jax import model as model_lib
  return module.body if isinstance(module, model_lib.RetinaNet) else module


def body_variables(module: nnx.Module) -> dict[str, nnx.Variable]:
  """The body's variables by torchvision name, e.g. `layer1.0.bn1.weight`."""
  from flax import nnx
  out = {}
  for path, node in nnx.iter_graph(_body(module)):
    if isinstance(node, (nnx.Param, nnx.BatchStat)):
      *parents, leaf = (str(p) for p in path)
      out[".".join([*parents, _SUFFIX[leaf]])] = node
  return out


def _expected_shapes() -> dict[str, tuple[int, ...]]:
  from flax import nnx
  from midog_jax import model as model_lib
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


def resolve(spec: str | None) -> str | None:
  """`model.body_weights` -> a weights file, or None for random initialisation."""
  if spec is None or spec.strip().lower() in SCRATCH:
    return None
  if spec == IMAGENET:
    return fetch_imagenet()
  return os.path.expanduser(spec)


def fetch_imagenet() -> str:
  """torchvision's ResNet18 ImageNet weights, from the hub's cache or fetched."""
  from huggingface_hub import hf_hub_download  # Only for the pretrained default.
  from huggingface_hub.errors import LocalEntryNotFoundError
  args = dict(repo_id=IMAGENET_REPO, filename=IMAGENET_FILE, revision=IMAGENET_REVISION)
  try:
    return _verified(hf_hub_download(**args, local_files_only=True))
  except LocalEntryNotFoundError:
    pass
  from huggingface_hub import constants
  try:
    if not constants.HF_HUB_OFFLINE:
      _check_reachable(constants.ENDPOINT)
    path = hf_hub_download(**args, etag_timeout=10)
  except Exception as e:  # Offline, proxy, hub down: one line with the remedy.
    raise WeightsError(
        f"could not fetch the ImageNet weights {IMAGENET_URL} ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}); download that file where the "
        "internet is reachable and pass --config.model.body_weights=PATH, or "
        "--config.model.body_weights=none to train from scratch") from None
  return _verified(path)


def _check_reachable(url: str, timeout_s: float = 10.0) -> None:
  """Fails at once when offline, instead of after the hub client's retries.

  Skipped behind a proxy, where a direct connection may fail while the
  download works.
  """
  if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
    return
  parsed = urllib.parse.urlparse(url)
  port = parsed.port or (443 if parsed.scheme == "https" else 80)
  socket.create_connection((parsed.hostname, port), timeout=timeout_s).close()


def _verified(path: str) -> str:
  """Checks a hub download against the sha256 its cache blob is named by."""
  blob = os.path.basename(os.path.realpath(path))
  if re.fullmatch(r"[0-9a-f]{64}", blob):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        digest.update(chunk)
    if digest.hexdigest() != blob:
      raise WeightsError(f"{path}: sha256 {digest.hexdigest()} differs from the hub's {blob}; "
                         "delete it from the Hugging Face cache and run again")
  return path


def read_body_arrays(path: str) -> dict[str, np.ndarray]:
  """Body arrays from an .npz of `convert` or a torchvision-named .safetensors."""
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"body weights file {path} not found; use --config.model.body_weights=imagenet, or "
        "create it with `python -m midog_jax.weights convert --torchvision "
        f"resnet18-f37072fd.pth --out {path}`")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    try:
      return convert_state_dict(load_file(path), path)
    except (OSError, ValueError) as e:
      if isinstance(e, WeightsError):
        raise
      raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
  with np.load(path) as data:
    return {k: data[k] for k in data.files}


def load_body_weights(module: nnx.Module, path: str) -> None:
  """Loads body weights (.npz or .safetensors) into `module` in place."""
  import jax.numpy as jnp
  arrays = read_body_arrays(path)
  variables = body_variables(module)
  _check(arrays, _shapes(variables), path)
  for name, var in variables.items():
    var.set_value(jnp.asarray(arrays[name], var.get_value().dtype))


def main(argv: Sequence[str] | None = None) -> int:
  cli.quiet_startup()
  parser = argparse.ArgumentParser(prog="python -m midog_jax.weights",
                                   description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest="command", required=True)
  convert = commands.add_parser(
      "convert", help="torchvision ResNet18 checkpoint -> .npz")
  convert.add_argument("--torchvision", required=True,
                       help="path of resnet18-f37072fd.pth")
  convert.add_argument("--out", required=True, help="output .npz path")
  commands.add_parser("fetch", help=f"download {IMAGENET_URL} into the Hugging Face cache")
  args = parser.parse_args(argv)
  with cli.logging_to_stderr():
    return _run(args)


def _run(args: argparse.Namespace) -> int:
  if args.command == "convert":
    convert_torchvision(args.torchvision, args.out)
    print(f"wrote {args.out}")
  elif args.command == "fetch":
    try:
      path = fetch_imagenet()
      read_body_arrays(path)  # Every key and shape.
    except WeightsError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
