"""Decoded ROIs on disk: decoded once, identical pixels, never half-written."""

import os
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

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
  assert sorted(os.listdir(tmp_path / "d")) == sorted(
      os.path.basename(store.path(c)) for c in cases)


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
