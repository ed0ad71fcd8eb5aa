"""Random access to TFRecord shards by byte offset, without TensorFlow.

A TFDS split is a set of TFRecord shards whose record order depends on the
build (shard count, TFDS's shuffling by key, the TFDS version). Scanning the
shards once gives each record's location; reading a record later seeks
there, so a case is read by where its record is, never by its position in
some reading order.

TFRecord framing, little-endian: uint64 length, uint32 masked CRC of the
length, the record, uint32 masked CRC of the record. Both CRCs (CRC-32C) are
checked on every scan and read: a damaged shard stops the run at the
damaged record instead of training on it.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Iterator

import google_crc32c
from etils import epath

_HEADER = 12  # Length and its CRC.
_FOOTER = 4  # The record's CRC.
_MASK_DELTA = 0xA282EAD8  # TFRecord's CRC mask.
REMEDY = ("the shard is damaged; rebuild the dataset with `tfds build midogpp --imports "
          "tfds_midogpp`, or restore the file")


class RecordError(IOError):
  """A shard is truncated or damaged, or its framing does not match the index."""


@dataclasses.dataclass(frozen=True)
class Location:
  """Where one record is: a shard file (name in its folder), offset, length."""
  shard: str
  offset: int  # Of the record's header.
  length: int  # Of the serialized record.


def masked_crc(data: bytes) -> int:
  """TFRecord's masked CRC-32C of `data`."""
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def _damaged(path: epath.Path, offset: int, part: str, name: str | None) -> RecordError:
  case = f" ({name})" if name else ""
  return RecordError(f"{path}: the record at byte {offset}{case} fails its {part} CRC "
                     f"check; {REMEDY}")


def _check_header(path: epath.Path, offset: int, header: bytes, name: str | None) -> int:
  """The record length in a 12-byte header whose CRC matches it."""
  (crc,) = struct.unpack("<I", header[8:])
  if masked_crc(header[:8]) != crc:  # Before trusting the length: it may be garbage.
    raise _damaged(path, offset, "length", name)
  return struct.unpack("<Q", header[:8])[0]


def _check_data(path: epath.Path, offset: int, data: bytes, footer: bytes,
                name: str | None) -> None:
  if masked_crc(data) != struct.unpack("<I", footer)[0]:
    raise _damaged(path, offset, "data", name)


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
        raise RecordError(f"{path}: truncated record header at byte {offset}; rebuild the dataset")
      length = _check_header(path, offset, header, None)
      data = f.read(length)
      footer = f.read(_FOOTER)
      if len(data) < length or len(footer) < _FOOTER:
        raise RecordError(f"{path}: truncated record at byte {offset}; rebuild the dataset")
      _check_data(path, offset, data, footer, None)
      yield Location(path.name, offset, length), data
      offset += _HEADER + length + _FOOTER


def read(folder: epath.PathLike, location: Location, name: str | None = None) -> bytes:
  """The record at `location` in the shard `folder / location.shard`.

  `name` (e.g. the case's file name) is named in the error of a damaged record.
  """
  path = epath.Path(folder) / location.shard
  case = f" ({name})" if name else ""
  with path.open("rb") as f:
    f.seek(location.offset)
    header = f.read(_HEADER)
    if len(header) == _HEADER:
      length = _check_header(path, location.offset, header, name)
    if len(header) < _HEADER or length != location.length:
      raise RecordError(
          f"{path}: no record of {location.length} bytes at byte {location.offset}{case}; "
          "the dataset changed since its index was made (delete the midog_jax-*.json index "
          "files beside it)")
    data = f.read(location.length)
    footer = f.read(_FOOTER)
  if len(data) < location.length or len(footer) < _FOOTER:
    raise RecordError(f"{path}: truncated record at byte {location.offset}{case}; rebuild the "
                      "dataset")
  _check_data(path, location.offset, data, footer, name)
  return data
