"""Fault injection on a built dataset: damaged bytes stop the read or are healed.

A byte flipped inside a TFRecord shard (bit rot, a bad copy) must end in one
line naming the shard, the byte and the remedy, never in training on wrong
pixels; a decoded-ROI file zeroed at its size must be decoded again.
"""

import logging
import os
import pathlib
import shutil

import numpy as np
import pytest

from midog_jax.data import dataset
from midog_jax.data import records
from midog_jax.data import roi_io
from midog_jax.data import roi_store

REMEDY = "rebuild the dataset with `tfds build midogpp --imports tfds_midogpp`, or restore the file"


@pytest.fixture
def data_copy(synthetic_data_dir, tmp_path):
  """A private copy of the shared synthetic dataset (its files keep their times)."""
  copy = tmp_path / "data"
  shutil.copytree(synthetic_data_dir, copy)
  return str(copy)


def _manual(synthetic_data_dir) -> pathlib.Path:
  return pathlib.Path(synthetic_data_dir).parent / "manual"


def _flip_silently(path: pathlib.Path, at: int) -> None:
  """Flips one byte and keeps the file's size and times, as bit rot does."""
  st = os.stat(path)
  with open(path, "r+b") as f:
    f.seek(at)
    byte = f.read(1)
    f.seek(at)
    f.write(bytes([byte[0] ^ 0x10]))
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_flipped_byte_in_a_shard_stops_the_read_naming_shard_and_case(synthetic_data_dir,
                                                                        data_copy):
  cases = dataset.read_cases(data_copy, "train")  # The case index, made before the damage.
  reader = dataset.RoiReader(data_copy)
  case = cases[len(cases) // 2]
  shard = pathlib.Path(reader.folder) / case.record.shard
  reader(case)  # Readable before the damage.
  _flip_silently(shard, case.record.offset + 12 + case.record.length // 2)  # In its PNG.

  # Read by location (the index still matches the shard): the case is named.
  assert [c.file_name for c in dataset.read_cases(data_copy, "train")] == \
      [c.file_name for c in cases]
  with pytest.raises(records.RecordError) as by_location:
    reader(case)
  message = str(by_location.value)
  assert "\n" not in message
  assert message.startswith(f"{shard}: the record at byte {case.record.offset} "
                            f"({case.file_name}) fails its data CRC check")
  assert message.endswith(REMEDY)
  with pytest.raises(records.RecordError, match=case.file_name):
    list(dataset.iterate_rois(data_copy, cases))
  # The other cases are still read, with their own pixels.
  other = next(c for c in cases if c.record != case.record)
  np.testing.assert_array_equal(
      reader(other), roi_io.read_roi(_manual(synthetic_data_dir) / "images" / other.file_name))

  # A fresh index scans the shard: the damage is found there, naming shard and byte.
  for index in pathlib.Path(reader.folder).glob("midog_jax-cases-*.json"):
    index.unlink()
  with pytest.raises(records.RecordError) as scanned:
    dataset.read_cases(data_copy, "train")
  message = str(scanned.value)
  assert "\n" not in message
  assert message == (f"{shard}: the record at byte {case.record.offset} fails its data CRC "
                     f"check; the shard is damaged; {REMEDY}")


def test_a_flipped_length_byte_is_not_read_as_a_length(data_copy):
  cases = dataset.read_cases(data_copy, "test")
  reader = dataset.RoiReader(data_copy)
  case = cases[0]
  shard = pathlib.Path(reader.folder) / case.record.shard
  _flip_silently(shard, case.record.offset + 7)  # The length's top byte: a 1 PB record.
  with pytest.raises(records.RecordError, match=rf"byte {case.record.offset} \({case.file_name}\)"
                     " fails its length CRC check"):
    reader(case)


def test_a_zeroed_decoded_file_is_decoded_again(synthetic_data_dir, data_copy, tmp_path, caplog):
  cases = dataset.read_cases(data_copy, "train")[:2]
  reader = dataset.RoiReader(data_copy)
  folder = tmp_path / "decoded"
  first = roi_store.DecodedStore(reader, folder)
  for case in cases:
    first(case)
  path = first.path(cases[0])
  size = os.path.getsize(path)
  with open(path, "r+b") as f:  # Same size, every byte zero.
    f.write(bytes(size))
  assert os.path.getsize(path) == size

  run = roi_store.DecodedStore(reader, folder)  # The next run.
  with caplog.at_level(logging.WARNING):
    images = [np.array(run(case)) for case in cases]
  manual = _manual(synthetic_data_dir)
  for case, image in zip(cases, images):  # The source images, decoded independently.
    np.testing.assert_array_equal(image, roi_io.read_roi(manual / "images" / case.file_name))
  assert run.decodes == 1  # Only the damaged file.
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert len(warnings) == 1
  assert path in warnings[0] and "damaged" in warnings[0]
