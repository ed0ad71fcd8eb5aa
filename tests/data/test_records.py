"""TFRecord shards read by byte offset: TensorFlow's framing, and both CRCs checked."""

import struct

import pytest
import tensorflow as tf

from midog_jax.data import records

PAYLOADS = [b"", b"a", b"hello record", bytes(range(256)) * 3]


@pytest.fixture
def shard(tmp_path):
  """A shard written by TensorFlow's own writer (the oracle for framing and CRCs)."""
  path = tmp_path / "train.tfrecord-00000-of-00001"
  with tf.io.TFRecordWriter(str(path)) as writer:
    for p in PAYLOADS:
      writer.write(p)
  return path


def _offsets(payloads):
  out, offset = [], 0
  for p in payloads:
    out.append(offset)
    offset += 8 + 4 + len(p) + 4
  return out


def _flip(path, at):
  data = bytearray(path.read_bytes())
  data[at] ^= 0x01
  path.write_bytes(bytes(data))


def test_masked_crc_is_tensorflows():
  # The CRC-32C check value (RFC 3720, B.4) and TensorFlow's stored CRCs.
  raw = 0xE3069283
  assert records.masked_crc(b"123456789") == (
      ((raw >> 15) | (raw << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_scan_matches_tensorflows_writer_and_reader(shard):
  found = list(records.scan(shard))
  assert [data for _, data in found] == PAYLOADS
  assert [data.numpy() for data in tf.data.TFRecordDataset(str(shard))] == PAYLOADS
  assert [loc.offset for loc, _ in found] == _offsets(PAYLOADS)
  assert all(loc.shard == shard.name and loc.length == len(p)
             for (loc, _), p in zip(found, PAYLOADS))
  # The CRCs TensorFlow stored are the ones computed here.
  raw = shard.read_bytes()
  for offset, p in zip(_offsets(PAYLOADS), PAYLOADS):
    length_crc, = struct.unpack("<I", raw[offset + 8:offset + 12])
    data_crc, = struct.unpack("<I", raw[offset + 12 + len(p):offset + 16 + len(p)])
    assert length_crc == records.masked_crc(struct.pack("<Q", len(p)))
    assert data_crc == records.masked_crc(p)


def test_read_by_location(shard):
  for loc, data in reversed(list(records.scan(shard))):
    assert records.read(shard.parent, loc) == data


def test_an_empty_shard_has_no_record(tmp_path):
  (tmp_path / "empty").write_bytes(b"")
  assert list(records.scan(tmp_path / "empty")) == []


@pytest.mark.parametrize("where, part", [("data", "data"), ("footer", "data"),
                                         ("length", "length"), ("length_crc", "length")])
def test_a_flipped_byte_is_a_one_line_error_naming_the_shard_and_offset(shard, where, part):
  index = 3  # The long record, after three short ones.
  offset, n = _offsets(PAYLOADS)[index], len(PAYLOADS[index])
  at = {"data": offset + 12 + n // 2, "footer": offset + 12 + n + 1, "length": offset + 1,
        "length_crc": offset + 9}[where]
  location = records.Location(shard.name, offset, n)
  _flip(shard, at)
  with pytest.raises(records.RecordError) as scanned:
    list(records.scan(shard))
  with pytest.raises(records.RecordError) as read:
    records.read(shard.parent, location, name="042.tiff")
  for e in (scanned.value, read.value):
    message = str(e)
    assert "\n" not in message
    assert message.startswith(f"{shard}: the record at byte {offset}")
    assert f"fails its {part} CRC check" in message
    assert "rebuild the dataset with `tfds build midogpp --imports tfds_midogpp`" in message
    assert "or restore the file" in message
  assert "(042.tiff)" in str(read.value) and "042.tiff" not in str(scanned.value)
  # Records before the damage are still read (zip stops before the damaged one).
  for want, (_, data) in zip(PAYLOADS[:index], records.scan(shard)):
    assert data == want


def test_every_single_byte_flip_is_detected(shard):
  good = shard.read_bytes()
  for at in range(len(good)):
    data = bytearray(good)
    data[at] ^= 0x80
    shard.write_bytes(bytes(data))
    with pytest.raises(records.RecordError):
      list(records.scan(shard))


def test_truncation_and_a_stale_location_keep_their_messages(shard):
  offset, n = _offsets(PAYLOADS)[3], len(PAYLOADS[3])
  with pytest.raises(records.RecordError, match="changed since its index was made"):
    records.read(shard.parent, records.Location(shard.name, offset, n + 1))
  shard.write_bytes(shard.read_bytes()[:-2])
  with pytest.raises(records.RecordError, match=f"truncated record at byte {offset}"):
    list(records.scan(shard))
  with pytest.raises(records.RecordError, match=f"truncated record at byte {offset}"):
    records.read(shard.parent, records.Location(shard.name, offset, n))

