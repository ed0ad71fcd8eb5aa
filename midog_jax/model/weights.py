"""Pretrained body weights: fetched from the Hugging Face Hub, read, checked, loaded.

The reference builds its body with `create_body(models.resnet18, True, -2)`:
torchvision's ImageNet-1k weights. A backbone names its pretrained files
(`backbones.Backbone.pretrained`); `body_weights="imagenet"` (the default of
configs/default.py) fetches ResNet18's without PyTorch: timm's
`resnet18.tv_in1k` repository on the Hub holds torchvision's original
weights in safetensors format under torchvision's parameter names. A file
is downloaded once at a pinned revision into the hub's cache, checked
against the hub's sha256 and against every expected name and shape.

Files are keyed by torchvision's state-dict names (`layer1.0.bn1.weight`):
a `.safetensors` state dict as torchvision saves it (OIHW kernels), or an
`.npz` from `python -m midog_jax.weights convert` (HWIO kernels, `fc.*` and
`num_batches_tracked` dropped). This module knows no network: the caller
passes the body and the names and shapes it expects.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import re
import socket
import urllib.parse
from collections.abc import Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from midog_jax import atomic

# Our variable name -> torchvision's suffix.
_SUFFIX = {"kernel": "weight", "scale": "weight", "bias": "bias",
           "mean": "running_mean", "var": "running_var"}
_DROPPED_SUFFIXES = ("num_batches_tracked",)
_DROPPED_PREFIXES = ("fc.",)

IMAGENET = "imagenet"  # `model.body_weights` value: the backbone's ImageNet weights.
SCRATCH = ("", "none")  # `model.body_weights` values for random initialisation.


@dataclasses.dataclass(frozen=True)
class HubFile:
  """A weights file on the Hugging Face Hub at a pinned revision."""
  repo: str
  filename: str
  revision: str

  @property
  def url(self) -> str:
    return f"https://huggingface.co/{self.repo}/resolve/{self.revision}/{self.filename}"


class WeightsError(ValueError):
  """A weights file does not fit the body."""


def torchvision_name(path: Sequence[str]) -> str:
  """Our variable path, e.g. ("layer1", "0", "bn1", "scale") -> "layer1.0.bn1.weight"."""
  *parents, leaf = path
  return ".".join([*parents, _SUFFIX[leaf]])


def variables_by_name(body: nnx.Module, name: Callable[[Sequence[str]], str] = torchvision_name
                      ) -> dict[str, nnx.Variable]:
  """The body's parameters and BatchNorm statistics by file name."""
  return {name([str(p) for p in path]): node for path, node in nnx.iter_graph(body)
          if isinstance(node, (nnx.Param, nnx.BatchStat))}


def shapes(variables: Mapping[str, nnx.Variable]) -> dict[str, tuple[int, ...]]:
  return {k: tuple(v.get_value().shape) for k, v in variables.items()}


def check(arrays: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]],
          source: str, body: str = "the body") -> None:
  """Raises WeightsError listing missing, unexpected and mis-shaped names."""
  missing = sorted(set(expected) - set(arrays))
  unexpected = sorted(set(arrays) - set(expected))
  mismatched = sorted(
      f"{k}: file {tuple(arrays[k].shape)}, body {expected[k]}"
      for k in set(arrays) & set(expected)
      if tuple(arrays[k].shape) != expected[k])
  if missing or unexpected or mismatched:
    lines = [f"{source} does not fit {body}:"]
    for title, keys in (("missing", missing), ("unexpected", unexpected),
                        ("shape mismatch", mismatched)):
      if keys:
        lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys))
    raise WeightsError("\n".join(lines))


def convert_state_dict(state: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]],
                       source: str = "state dict", body: str = "the body"
                       ) -> dict[str, np.ndarray]:
  """A torchvision state dict (NumPy arrays) -> body arrays, checked against `expected`."""
  out = {}
  for name, value in state.items():
    if name.startswith(_DROPPED_PREFIXES) or name.endswith(_DROPPED_SUFFIXES):
      continue
    value = np.asarray(value, np.float32)
    # OIHW -> HWIO.
    out[name] = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
  check(out, expected, source, body)
  return out


def resolve(spec: str | None, pretrained: Mapping[str, HubFile]) -> str | None:
  """`model.body_weights` -> a weights file, or None for random initialisation.

  `pretrained` holds the backbone's named files ("imagenet": ...).
  """
  if spec is None or spec.strip().lower() in SCRATCH:
    return None
  if spec in pretrained:
    return fetch(pretrained[spec])
  if spec == IMAGENET:
    raise WeightsError("this backbone has no ImageNet weights; pass "
                       "--config.model.body_weights=PATH or =none")
  return os.path.expanduser(spec)


def fetch(hub_file: HubFile) -> str:
  """A pinned hub file, from the hub's cache or fetched, checked by sha256."""
  from huggingface_hub import constants, hf_hub_download  # Only when weights are fetched.
  from huggingface_hub.errors import LocalEntryNotFoundError
  args = dict(repo_id=hub_file.repo, filename=hub_file.filename, revision=hub_file.revision)
  try:
    return _verified(hf_hub_download(**args, local_files_only=True))
  except LocalEntryNotFoundError:
    pass
  try:
    if not constants.HF_HUB_OFFLINE:
      _check_reachable(constants.ENDPOINT)
    path = hf_hub_download(**args, etag_timeout=10)
  except Exception as e:  # Offline, proxy, hub down: one line with the remedy.
    raise WeightsError(
        f"could not fetch the weights {hub_file.url} ({type(e).__name__}: "
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


def read_arrays(path: str, expected: Mapping[str, tuple[int, ...]], body: str = "the body"
                ) -> dict[str, np.ndarray]:
  """Body arrays from an .npz of `convert` or a torchvision-named .safetensors, checked."""
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"body weights file {path} not found; use --config.model.body_weights=imagenet, or "
        "create it with `python -m midog_jax.weights convert --torchvision "
        f"resnet18-f37072fd.pth --out {path}`")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    try:
      state = load_file(path)
    except (OSError, ValueError) as e:
      raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
    return convert_state_dict(state, expected, path, body)
  with np.load(path) as data:
    arrays = {k: data[k] for k in data.files}
  check(arrays, expected, path, body)
  return arrays


def load_into(variables: Mapping[str, nnx.Variable], path: str, body: str = "the body") -> None:
  """Loads a weights file into `variables` (`variables_by_name` of a body) in place."""
  arrays = read_arrays(path, shapes(variables), body)
  for name, var in variables.items():
    var.set_value(jnp.asarray(arrays[name], var.get_value().dtype))


def write_npz(path: str, arrays: Mapping[str, np.ndarray]) -> None:
  """Writes body arrays as .npz, whole or not at all."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  atomic.write_bytes(path, buffer.getbuffer())
