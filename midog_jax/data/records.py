"""Random access to TFRecord shards by byte offset, without TensorFlow.

A TFDS split is a set of TFRecord shards whose record order depends on the
build (shard count, TFDS's shuffling by key, the TFDS version). Scanning the
shards once gives each record's location; reading a record later seeks
there, so a case is read by where its record is, never by its position in
some reading order.

TFRecord framing, little-endian: uint64 length, uint32 masked CRC of the
length, the record, uint32 masked CRC of the record.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Iterator

from etils import epath

_HEADER = 12  # Length and its CRC.
_FOOTER = 4  # The record's CRC.


class RecordError(IOError):
  """A shard is truncated or its framing does not match the index."""


@dataclasses.dataclass(frozen=True)
class Location:
  """Where one record is: a shard file (name in its folder), offset, length."""
  shard: str
  offset: int  # Of the record's header.
  length: int  # Of the serialized record.


def scan(path: epath.PathLike) -> Iterator[tuple[Location, bytes]]:
  """Every record of one shard with its location, in file order."""
  path = epath.Path(path)
  with path.open("rb") as f:
    offset = 0
    while True:
      header = f.read(_HEADER)
      if not header:
        return
      if len(header) < _HEADER:
        raise RecordError(f"{path}: truncated record header at byte {offset}")
      (length,) = struct.unpack("<Q", header[:8])
      data = f.read(length)
      footer = f.read(_FOOTER)
      if len(data) < length or len(footer) < _FOOTER:
        raise RecordError(f"{path}: truncated record at byte {offset}; rebuild the dataset")
      yield Location(path.name, offset, length), data
      offset += _HEADER + length + _FOOTER


def read(folder: epath.PathLike, location: Location) -> bytes:
  """The record at `location` in the shard `folder / location.shard`."""
  path = epath.Path(folder) / location.shard
  with path.open("rb") as f:
    f.seek(location.offset)
    header = f.read(_HEADER)
    if len(header) < _HEADER or struct.unpack("<Q", header[:8])[0] != location.length:
      raise RecordError(
          f"{path}: no record of {location.length} bytes at byte {location.offset}; the "
          "dataset changed since its index was made (delete the midog_jax-*.json index "
          "files beside it)")
    data = f.read(location.length)
  if len(data) < location.length:
    raise RecordError(f"{path}: truncated record at byte {location.offset}; rebuild the dataset")
  return data
