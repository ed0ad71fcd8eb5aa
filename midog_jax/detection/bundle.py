"""A trained model as one self-describing folder: export, verify, load.

A bundle holds one member (a run) or several (e.g. the five folds of one
experiment, an ensemble):

  bundle.json                  format, package version, members, the
                               ensemble's operating point, sha256 of every file
  README.md                    the model card (Hugging Face's format)
  <member>/model.safetensors   float32 weights and BatchNorm statistics,
                               named by their place in the network
                               ("params/body/conv1/kernel")
  <member>/config.json         the run's configuration
  <member>/normalization.json  its normalisation (and stain.json, if any)
  <member>/cases.json          the cases it trained and validated on
  <member>/evaluation.json     its evaluation (operating point chosen on its
                               validation fold, test metrics), if evaluated
  <member>/run.json            checkpoint step, where it was exported from

Loading needs neither TensorFlow, Orbax nor the dataset: the network is
built from `config.json` and every tensor is checked by name, shape and the
bundle's checksums before use. Export is deterministic (the same run gives
the same bytes), written into a temporary folder and renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from importlib import metadata
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from safetensors import numpy as safetensors_np

from midog_jax import atomic

FORMAT = "midog-jax-bundle/1"
WEIGHTS = "model.safetensors"
REQUIRED = ("config.json", "normalization.json", "cases.json", "run.json", WEIGHTS)
OPTIONAL = ("stain.json", "evaluation.json")


class BundleError(ValueError):
  """A bundle that cannot be used; the message names the file and the remedy."""


def package_version() -> str:
  try:
    return metadata.version("midog-jax")
  except metadata.PackageNotFoundError:
    return "unknown"


_GROUPS = ("params", "batch_stats")


def _name(group: str, path) -> str:
  """"params/body/conv1/kernel": a leaf's name from its place in the network."""
  return "/".join([group, *(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)])


def named_leaves(params: nnx.State, batch_stats: nnx.State) -> dict[str, Any]:
  """{name: leaf} of both states (arrays, or jax.ShapeDtypeStruct for states of shapes)."""
  return {_name(group, path): leaf
          for group, state in zip(_GROUPS, (params, batch_stats))
          for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]}


def flatten(params: nnx.State, batch_stats: nnx.State) -> dict[str, np.ndarray]:
  """{"params/body/conv1/kernel": float32 array, ...}: what a bundle stores."""
  return {k: np.asarray(jax.device_get(v), np.float32)
          for k, v in named_leaves(params, batch_stats).items()}


def unflatten(arrays: Mapping[str, np.ndarray], params: nnx.State, batch_stats: nnx.State,
              where: str) -> tuple[nnx.State, nnx.State]:
  """The states of `params`/`batch_stats` (shapes) filled from `arrays`, checked first."""
  expected = {k: tuple(v.shape) for k, v in named_leaves(params, batch_stats).items()}
  missing = sorted(set(expected) - set(arrays))
  extra = sorted(set(arrays) - set(expected))
  wrong = sorted(k for k in set(expected) & set(arrays) if tuple(arrays[k].shape) != expected[k])
  if missing or extra or wrong:
    parts = [f"{len(missing)} tensor(s) missing ({', '.join(missing[:3])})" if missing else "",
             f"{len(extra)} unknown ({', '.join(extra[:3])})" if extra else "",
             f"{len(wrong)} of another shape ({wrong[0]}: {tuple(arrays[wrong[0]].shape)} "
             f"instead of {expected[wrong[0]]})" if wrong else ""]
    raise BundleError(f"{where}: does not fit its config.json: "
                      f"{'; '.join(p for p in parts if p)}; export the run again")
  filled = []
  for group, state in zip(_GROUPS, (params, batch_stats)):
    pure = jax.tree_util.tree_map_with_path(
        lambda path, _, g=group: np.asarray(arrays[_name(g, path)]), nnx.to_pure_dict(state))
    new = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(new, pure)
    filled.append(new)
  return filled[0], filled[1]


def sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _json_bytes(value: Any) -> bytes:
  """Canonical JSON: sorted keys, so the same content gives the same bytes."""
  return (json.dumps(value, indent=1, sort_keys=True, allow_nan=True) + "\n").encode()


def write(out_dir: str, members: Sequence[Mapping[str, Any]], card: str,
          extra: Mapping[str, Any] | None = None) -> str:
  """Writes a bundle of `members` (each: name, arrays, files: {file name: JSON}
  of `REQUIRED` and `OPTIONAL`) into `out_dir`, replacing a bundle already there.

  Written into a temporary folder beside it and renamed: a kill leaves the old
  bundle or the new one, never a mixture.
  """
  out_dir = os.path.abspath(out_dir.rstrip("/"))
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  if os.path.exists(out_dir) and not os.path.exists(os.path.join(out_dir, "bundle.json")):
    raise BundleError(f"{out_dir}: exists and is not a bundle; choose another --out")
  tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{uuid.uuid4().hex[:8]}")
  os.makedirs(tmp)
  try:
    checksums = {}
    for m in members:
      folder = os.path.join(tmp, m["name"])
      os.makedirs(folder)
      files = {name: _json_bytes(m["files"][name]) for name in REQUIRED + OPTIONAL
               if name != WEIGHTS and m["files"].get(name) is not None}
      for name, data in files.items():
        with open(os.path.join(folder, name), "wb") as f:
          f.write(data)
      # Sorted names and no metadata that varies: the same arrays give the same bytes.
      safetensors_np.save_file({k: np.ascontiguousarray(m["arrays"][k])
                                for k in sorted(m["arrays"])}, os.path.join(folder, WEIGHTS),
                               metadata={"format": FORMAT})
      for name in sorted(os.listdir(folder)):
        os.chmod(os.path.join(folder, name), 0o644)  # safetensors writes 0600.
        checksums[f"{m['name']}/{name}"] = sha256(os.path.join(folder, name))
    with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
      f.write(card)
    checksums["README.md"] = sha256(os.path.join(tmp, "README.md"))
    index = {"format": FORMAT, "package_version": package_version(),
             "members": [m["name"] for m in members], "sha256": checksums, **(extra or {})}
    with open(os.path.join(tmp, "bundle.json"), "wb") as f:
      f.write(_json_bytes(index))
    for root, _, names in os.walk(tmp):  # On disk before the rename makes it visible.
      for name in names:
        with open(os.path.join(root, name), "rb") as f:
          os.fsync(f.fileno())
    old = None
    if os.path.exists(out_dir):
      old = f"{tmp}.old"
      os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old:
      shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir


def is_bundle(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "bundle.json"))


def read_index(path: str) -> dict[str, Any]:
  """bundle.json, its format checked, and every file it lists checked against its sha256."""
  index_path = os.path.join(path, "bundle.json")
  try:
    index = atomic.read_json(index_path)
  except (OSError, ValueError) as e:
    raise BundleError(f"{index_path}: unreadable ({e}); download or export the bundle again") from None
  if index.get("format") != FORMAT:
    raise BundleError(f"{index_path}: format {index.get('format')!r}, this version reads "
                      f"{FORMAT!r}; export the run again with this version")
  for name, digest in sorted(index.get("sha256", {}).items()):
    file = os.path.join(path, name)
    if not os.path.exists(file):
      raise BundleError(f"{file}: missing from the bundle; download or export it again")
    if sha256(file) != digest:
      raise BundleError(f"{file}: damaged (its sha256 differs from bundle.json's); download "
                        "or export the bundle again")
  for member in index.get("members", []):
    for name in REQUIRED:
      if f"{member}/{name}" not in index.get("sha256", {}):
        raise BundleError(f"{index_path}: member {member} lacks {name}; export the run again")
  return index


def read_arrays(path: str, member: str) -> dict[str, np.ndarray]:
  """One member's tensors."""
  file = os.path.join(path, member, WEIGHTS)
  try:
    return safetensors_np.load_file(file)
  except Exception as e:  # safetensors raises its own error types for a bad header.
    raise BundleError(f"{file}: unreadable ({e}); download or export the bundle again") from None
