"""Batches from a built synthetic `midogpp`, on 1 and 4 fake CPU devices."""

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import Mesh, PartitionSpec as P

from midog_jax.data import annotations
from midog_jax.data import augment
from midog_jax.data import crops
from midog_jax.data import dataset
from midog_jax.data import input_pipeline
from midog_jax.data import synthetic
from tfds_midogpp.midogpp import midogpp_dataset_builder as builder_lib

PATCH = 64


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  manual = tmp_path_factory.mktemp("manual")
  data = tmp_path_factory.mktemp("tfds")
  synthetic.write_dataset(str(manual), 2, 160, 120, seed=2, density_scale=200, progress=False)
  builder_lib.Builder(data_dir=str(data)).download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  return str(data)


@pytest.fixture(scope="module")
def train_cases(data_dir):
  return dataset.read_cases(data_dir, "train")


def _input(data_dir, cases, devices, **kw):
  reader = dataset.RoiReader(data_dir)
  by_id = {c.case_id: c for c in cases}
  mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
  args = dict(patch_size=PATCH, patches_per_epoch=40, global_batch_size=8, seed=7,
              cache_bytes=1 << 30, mesh=mesh)
  args.update(kw)
  return input_pipeline.PatchInput(cases, lambda i: reader(by_id[i]), **args)


def test_case_selection_and_metadata(data_dir, train_cases):
  assert len(train_cases) == 10 and {c.split for c in train_cases} == {"train"}
  assert all((c.width, c.height) == (160, 120) for c in train_cases)
  lymphoma = dataset.select_cases(train_cases, tumor_types="canine lymphosarcoma")
  assert [c.domain for c in lymphoma] == ["3"]
  assert len(dataset.select_cases(train_cases, domain_ids=["1a", "1b"])) == 2
  with pytest.raises(ValueError, match="tumour types"):
    dataset.select_cases(train_cases[:2], tumor_types="human melanoma")
  with pytest.raises(ValueError, match="listed case"):
    dataset.select_cases(train_cases, file_names=["999.tiff"])


@pytest.mark.parametrize("devices", [1, 4])
def test_batches_shapes_sharding_and_determinism(data_dir, train_cases, devices):
  pipe = _input(data_dir, train_cases, devices)
  assert pipe.steps_per_epoch == 5  # 40 patches / batch 8.
  assert not pipe.reuse_buffers  # CPU arrays alias host memory: never refill them.
  run = list(pipe.batches(0, epochs=2))
  assert len(run) == 10
  c = augment.crop_size(PATCH)
  b = run[0]
  assert b["crops"].shape == (8, c, c, 3) and b["crops"].dtype == np.uint8
  assert b["centers"].shape == (8, pipe.max_objects, 2) and b["centers"].dtype == np.float32
  assert b["valid"].dtype == bool and b["labels"].shape == (8, pipe.max_objects)
  for x in b.values():
    assert x.sharding.spec == P("data") and len(x.sharding.device_set) == devices
  # Hard negatives stay in the batch metadata (label 2).
  assert any((np.asarray(x["labels"]) == annotations.NON_MITOTIC_FIGURE).any() for x in run)
  again = list(_input(data_dir, train_cases, devices).batches(0, epochs=2))
  resumed = list(_input(data_dir, train_cases, devices).batches(3, epochs=2))
  for got, want in ((again, run), (resumed, run[3:])):
    assert len(got) == len(want)
    for g, w in zip(got, want):
      for k in w:
        np.testing.assert_array_equal(np.asarray(g[k]), np.asarray(w[k]))
  # Epochs differ; crops hold the true image pixels at the patch.
  assert not np.array_equal(np.asarray(run[0]["crops"]), np.asarray(run[5]["crops"]))


def test_same_batches_on_1_and_4_devices(data_dir, train_cases):
  one = next(_input(data_dir, train_cases, 1).batches(2))
  four = next(_input(data_dir, train_cases, 4).batches(2))
  for k in one:
    np.testing.assert_array_equal(np.asarray(one[k]), np.asarray(four[k]))


def test_crops_match_the_image(data_dir, train_cases):
  pipe = _input(data_dir, train_cases, 1, prefetch=0)
  plan = pipe.plan(0)
  batch = next(pipe.host_batches(0))
  m = (pipe.crop_size - PATCH) // 2
  reader = dataset.RoiReader(data_dir)
  by_id = {c.case_id: c for c in train_cases}
  for j in range(8):
    image = reader(by_id[int(batch["case_id"][j])])
    x0, y0 = int(plan.x0[j]), int(plan.y0[j])
    np.testing.assert_array_equal(batch["crops"][j, m:m + PATCH, m:m + PATCH],
                                  image[y0:y0 + PATCH, x0:x0 + PATCH])


def test_validation_set_is_fixed_and_streaming_matches_cache(data_dir, train_cases):
  val = _input(data_dir, train_cases, 1, validation=True, patches_per_epoch=20)
  first = list(val.host_batches(0, epochs=1))
  second = list(val.host_batches(0, epochs=1))
  streamed = list(_input(data_dir, train_cases, 1, validation=True, patches_per_epoch=20,
                         cache_bytes=0).host_batches(0, epochs=1))
  assert len(first) == 2
  for a, b, s in zip(first, second, streamed):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
      np.testing.assert_array_equal(a[k], s[k])


def test_normalization_from_tissue_statistics(train_cases):
  stats = dataset.normalization_of(train_cases)
  assert all(100 < m < 255 for m in stats.mean) and all(s > 1 for s in stats.std)


def test_bad_batch_size(data_dir, train_cases):
  with pytest.raises(ValueError, match="does not divide.*a multiple of 4 \\(e.g. 4 or 8\\)"):
    _input(data_dir, train_cases, 4, global_batch_size=6)
  with pytest.raises(ValueError, match="a multiple of 8 \\(e.g. 8 or 16\\), or use fewer devices"):
    _input(data_dir, train_cases, 8, global_batch_size=12)


def test_run_settings_are_checked_before_training(data_dir):
  from midog_jax.training import inputs
  from tests.train_fixtures import tiny_config
  with pytest.raises(ValueError, match=r"patch_size 256 is larger than every image.*160 x 120"):
    inputs.build(tiny_config(data_dir, patch_size=256))
  with pytest.raises(ValueError, match=r"valid_patches_per_epoch"):
    inputs.build(tiny_config(data_dir, valid_patches_per_epoch=4))
  with pytest.raises(ValueError, match=r"lower num_folds"):
    inputs.build(tiny_config(data_dir, num_folds=11))


def test_batches_do_not_depend_on_the_number_of_workers(data_dir, train_cases):
  def host(workers, start=0, **kw):
    pipe = _input(data_dir, train_cases, 1, workers=workers, prefetch=0, **kw)
    assert pipe.workers == workers
    return [{k: v.copy() for k, v in b.items()} for b in pipe.host_batches(start, epochs=2)]

  one = host(1)
  assert len(one) == 10
  runs = [host(2), host(3), host(3, reuse_buffers=True, window=2, cache_bytes=0)]
  resumed = host(2, start=4, reuse_buffers=True)
  for got, want in [(r, one) for r in runs] + [(resumed, one[4:])]:
    assert len(got) == len(want)
    for g, w in zip(got, want):
      for k in w:
        np.testing.assert_array_equal(g[k], w[k])
  # The global batches too, prepared ahead in the prefetch thread.
  three = list(_input(data_dir, train_cases, 4, workers=3).batches(0, epochs=2))
  for g, w in zip(three, one, strict=True):
    for k in w:
      np.testing.assert_array_equal(np.asarray(g[k]), w[k])
  assert _input(data_dir, train_cases, 1).workers == crops.default_workers() >= 1
