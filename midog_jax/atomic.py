"""Files written whole or not at all: write to a temporary name, then rename.

A kill at any instant leaves either the old file or the new one, never a
half-written one (rename is atomic within a file system).
"""

from __future__ import annotations

import io
import json
import os
import uuid
from typing import Any

from etils import epath


def write_text(path: epath.PathLike, text: str) -> None:
  """Replaces `path` with `text` atomically (local paths and gs:// alike)."""
  write_bytes(path, text.encode("utf-8"))


def write_bytes(path: epath.PathLike, data: bytes | memoryview) -> None:
  """Replaces `path` with `data` atomically (local paths and gs:// alike).

  A memoryview (e.g. of a NumPy array) is written without a copy.
  """
  path = epath.Path(path)
  tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
  try:
    if "://" not in str(path):
      with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # The data is on disk before the name points at it.
    else:
      tmp.write_bytes(bytes(data))
    tmp.replace(path)
  finally:
    if tmp.exists():
      tmp.unlink()


def write_figure(path: epath.PathLike, figure: Any, **savefig_kwargs: Any) -> None:
  """A Matplotlib figure saved to `path` atomically (the format from its suffix)."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format=os.path.splitext(str(path))[1][1:] or "png", **savefig_kwargs)
  write_bytes(path, buffer.getbuffer())


def write_json(path: epath.PathLike, obj: Any, indent: int | None = 1) -> None:
  """`json.dump` to `path` atomically."""
  write_text(path, json.dumps(obj, indent=indent) + "\n")


def read_json(path: epath.PathLike) -> Any:
  """The JSON in `path`; a parse error names the file."""
  path = epath.Path(path)
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None
