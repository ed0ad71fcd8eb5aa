"""Decoded ROIs on disk: decoded once, identical pixels, never half-written."""

import logging
import os
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from midog_jax import atomic
from midog_jax.data import dataset
from midog_jax.data import roi_store
from midog_jax.training import inputs
from tests.train_fixtures import tiny_config


@pytest.fixture(scope="module")
def cases_and_reader(synthetic_data_dir):
  return dataset.read_cases(synthetic_data_dir, "train")[:3], dataset.RoiReader(synthetic_data_dir)


def test_pixels_identical_and_decoded_once(cases_and_reader, tmp_path):
  cases, reader = cases_and_reader
  store = roi_store.DecodedStore(reader, tmp_path / "d")
  for case in cases:
    image = store(case)
    assert isinstance(image, np.memmap) and not image.flags.writeable
    np.testing.assert_array_equal(image, reader(case))
  again = roi_store.DecodedStore(reader, tmp_path / "d")  # Another run, same folder.
  for case in cases:
    np.testing.assert_array_equal(again(case), reader(case))
  assert (store.decodes, again.decodes) == (len(cases), 0)
  raw = [os.path.basename(store.path(c)) for c in cases]
  assert sorted(os.listdir(tmp_path / "d")) == sorted(raw + [f + ".crc32c" for f in raw])


def test_a_failed_write_leaves_nothing(cases_and_reader, tmp_path, monkeypatch):
  cases, reader = cases_and_reader
  store = roi_store.DecodedStore(reader, tmp_path / "d")

  def full_disk(fd):  # The data is written, its flush to disk fails.
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(os, "fsync", full_disk)
  with pytest.raises(OSError, match="No space left"):
    store(cases[0])
  assert os.listdir(tmp_path / "d") == []
  monkeypatch.undo()
  np.testing.assert_array_equal(store(cases[0]), reader(cases[0]))


def test_a_file_of_the_wrong_size_is_made_again(cases_and_reader, tmp_path):
  cases, reader = cases_and_reader
  store = roi_store.DecodedStore(reader, tmp_path / "d")
  with open(store.path(cases[0]), "wb") as f:  # E.g. from a file system that lost data.
    f.write(b"\0" * 10)
  np.testing.assert_array_equal(store(cases[0]), reader(cases[0]))
  assert store.decodes == 1


def _zero(path):
  """Overwrites a file with zeros at the same size (e.g. a disk that lost its blocks)."""
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.write(b"\0" * size)


def test_a_damaged_file_of_the_right_size_is_decoded_again(cases_and_reader, tmp_path, caplog):
  cases, reader = cases_and_reader
  store = roi_store.DecodedStore(reader, tmp_path / "d")
  store(cases[0])
  _zero(store.path(cases[0]))
  assert not np.memmap(store.path(cases[0]), np.uint8, "r").any()
  again = roi_store.DecodedStore(reader, tmp_path / "d")  # The next run.
  with caplog.at_level(logging.WARNING):
    image = again(cases[0])
  np.testing.assert_array_equal(image, reader(cases[0]))
  assert again.decodes == 1
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and store.path(cases[0]) in warnings[0]
  assert "damaged" in warnings[0] and "decoding it again" in warnings[0]
  # Healed: a third run uses the file as it is.
  third = roi_store.DecodedStore(reader, tmp_path / "d")
  np.testing.assert_array_equal(third(cases[0]), reader(cases[0]))
  assert third.decodes == 0


def test_a_file_is_checked_once_per_process(cases_and_reader, tmp_path, monkeypatch):
  cases, reader = cases_and_reader
  roi_store.DecodedStore(reader, tmp_path / "d")(cases[0])
  store = roi_store.DecodedStore(reader, tmp_path / "d")
  checks = []
  real = roi_store._crc32c
  monkeypatch.setattr(roi_store, "_crc32c", lambda a: checks.append(a.nbytes) or real(a))
  for _ in range(3):
    store(cases[0])
  assert checks == [cases[0].width * cases[0].height * 3] and store.decodes == 0


@pytest.mark.parametrize("sidecar", ["missing", "garbage", "wrong"])
def test_a_file_without_a_good_checksum_is_decoded_again(cases_and_reader, tmp_path, sidecar):
  cases, reader = cases_and_reader
  store = roi_store.DecodedStore(reader, tmp_path / "d")
  path = store.path(cases[0])
  store(cases[0])
  check = path + ".crc32c"
  good = atomic.read_json(check)
  assert good["bytes"] == os.path.getsize(path)
  if sidecar == "missing":  # A store written by an earlier version, or a kill in between.
    os.remove(check)
  elif sidecar == "garbage":
    with open(check, "wb") as f:
      f.write(b"\xff{")
  else:
    atomic.write_json(check, {**good, "crc32c": (good["crc32c"] + 1) % 2**32})
  again = roi_store.DecodedStore(reader, tmp_path / "d")
  np.testing.assert_array_equal(again(cases[0]), reader(cases[0]))
  assert again.decodes == 1 and atomic.read_json(check) == good  # Both written again.


def test_a_store_of_an_earlier_version_is_healed_saying_so_once(cases_and_reader, tmp_path,
                                                                 caplog):
  cases, reader = cases_and_reader
  store = roi_store.DecodedStore(reader, tmp_path / "d")
  for case in cases:
    store(case)
    os.remove(store.path(case) + ".crc32c")  # As the earlier version left them.
  again = roi_store.DecodedStore(reader, tmp_path / "d")
  with caplog.at_level(logging.DEBUG):
    for case in cases:
      np.testing.assert_array_equal(again(case), reader(case))
  told = [r for r in caplog.records if "has no checksum" in r.getMessage()]
  assert [r.levelno for r in told] == [logging.INFO] + [logging.DEBUG] * (len(cases) - 1)
  assert again.decodes == len(cases)
  assert all(os.path.exists(again.path(c) + ".crc32c") for c in cases)


def test_the_checksum_is_written_after_the_file(cases_and_reader, tmp_path, monkeypatch):
  cases, reader = cases_and_reader
  store = roi_store.DecodedStore(reader, tmp_path / "d")
  path = store.path(cases[0])
  store(cases[0])
  _zero(path)
  order = []
  real_bytes, real_json = atomic.write_bytes, atomic.write_json
  monkeypatch.setattr(atomic, "write_bytes", lambda p, d: (
      order.append(("data", os.path.exists(path + ".crc32c"))), real_bytes(p, d)))

  def killed(p, obj, indent=1):  # The process dies before the checksum is committed.
    order.append(("checksum", None))
    raise KeyboardInterrupt
  monkeypatch.setattr(atomic, "write_json", killed)
  with pytest.raises(KeyboardInterrupt):
    roi_store.DecodedStore(reader, tmp_path / "d")(cases[0])
  # The stale checksum went before the data changed; the new one was never written.
  assert order == [("data", False), ("checksum", None)]
  assert os.path.exists(path) and not os.path.exists(path + ".crc32c")
  monkeypatch.setattr(atomic, "write_json", real_json)
  again = roi_store.DecodedStore(reader, tmp_path / "d")
  np.testing.assert_array_equal(again(cases[0]), reader(cases[0]))
  assert again.decodes == 1 and os.path.exists(path + ".crc32c")


def test_choose(cases_and_reader, tmp_path, monkeypatch):
  cases, _ = cases_and_reader
  need = roi_store.decoded_bytes(cases)
  assert need == sum(c.width * c.height * 3 for c in cases) > 0
  assert roi_store.choose("auto", cases, 0, str(tmp_path / "new" / "dir")) == "disk"
  assert roi_store.choose("auto", cases, 1 << 40, "gs://bucket/d") == "ram"
  assert roi_store.choose("ram", cases, 0, str(tmp_path)) == "ram"
  assert roi_store.choose("disk", cases, 1 << 40, str(tmp_path)) == "disk"
  with pytest.raises(ValueError, match="roi_store 'memory': expected one of auto, ram, disk"):
    roi_store.choose("memory", cases, 0, str(tmp_path))
  full = shutil.disk_usage(tmp_path)._replace(free=need)  # Less than need + 1 GB.
  monkeypatch.setattr(shutil, "disk_usage", lambda _: full)
  assert roi_store.choose("auto", cases, 0, str(tmp_path)) == "ram"
  with pytest.raises(ValueError, match="need a local folder"):
    roi_store.DecodedStore(None, "gs://bucket/d")


@pytest.mark.parametrize("store", ["disk"])
def test_training_batches_identical_from_ram_and_disk(synthetic_data_dir, tmp_path, store):
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  batches = {}
  for mode in ("ram", store):
    config = tiny_config(synthetic_data_dir, roi_store=mode, decoded_dir=str(tmp_path / "d"))
    data = inputs.build(config, mesh)
    batches[mode] = [b for _, b in zip(range(3), data.train.host_batches(0))]
  assert os.listdir(tmp_path / "d")  # The disk run used the store.
  for a, b in zip(batches["ram"], batches[store]):
    for key in a:
      np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)
