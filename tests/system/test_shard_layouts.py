"""The same cases and pixels whatever the shard layout of the build (1, 2, 7).

The real splits are always written as many shards, and TFDS orders records
within them by a hash of the key: nothing may depend on record order.
"""

import pathlib
import shutil

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import Mesh

from midog_jax.data import dataset
from midog_jax.data import records
from midog_jax.data import roi_io
from midog_jax.evaluation import runs
from midog_jax.training import inputs
from tests.train_fixtures import tiny_config

LAYOUTS = (1, 2, 7)


def _manual(layouts) -> pathlib.Path:
  return pathlib.Path(layouts[2]).parent / "manual"


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_layout_holds_the_same_cases(synthetic_layouts, split):
  by_layout = {n: dataset.read_cases(synthetic_layouts[n], split) for n in LAYOUTS}
  for n in LAYOUTS:
    builder = tfds.builder_from_directory(
        str(pathlib.Path(synthetic_layouts[n]) / "midogpp" / "full" / "1.1.0"))
    assert builder.info.splits[split].num_shards == n
    assert len({c.record.shard for c in by_layout[n]}) == n
  reference = by_layout[1]
  assert [c.case_id for c in reference] == sorted(c.case_id for c in reference)
  for n in LAYOUTS[1:]:
    cases = by_layout[n]
    assert [c.file_name for c in cases] == [c.file_name for c in reference]
    for a, b in zip(cases, reference):
      assert (a.case_id, a.tumor, a.domain, a.width, a.height, a.um_per_px) == \
          (b.case_id, b.tumor, b.domain, b.width, b.height, b.um_per_px)
      np.testing.assert_array_equal(a.centers, b.centers)
      np.testing.assert_array_equal(a.labels, b.labels)
      np.testing.assert_array_equal(a.tissue_mean, b.tissue_mean)
  # Storage order is not case order: reading by position would mix cases up.
  stored = sorted(by_layout[7], key=lambda c: (c.record.shard, c.record.offset))
  assert [c.case_id for c in stored] != [c.case_id for c in reference]


def test_roi_reader_gives_each_case_its_own_pixels(synthetic_layouts):
  manual = _manual(synthetic_layouts)
  for n in LAYOUTS:
    reader = dataset.RoiReader(synthetic_layouts[n])
    for split in ("train", "test"):
      for case in reversed(dataset.read_cases(synthetic_layouts[n], split)):
        np.testing.assert_array_equal(reader(case),
                                      roi_io.read_roi(manual / "images" / case.file_name))
    # iterate_rois pairs every case with its image too.
    cases = dataset.read_cases(synthetic_layouts[n], "test")
    seen = {c.file_name: img for c, img in dataset.iterate_rois(synthetic_layouts[n], cases)}
    assert sorted(seen) == sorted(c.file_name for c in cases)
    name = cases[0].file_name
    np.testing.assert_array_equal(seen[name], roi_io.read_roi(manual / "images" / name))


def test_case_index_is_kept_and_remade_when_the_build_changes(synthetic_layouts, tmp_path):
  data = tmp_path / "copy"
  shutil.copytree(synthetic_layouts[7], data)
  folder = data / "midogpp" / "full" / "1.1.0"
  first = dataset.read_cases(str(data), "test")
  index = folder / "midog_jax-cases-test.json"
  assert index.exists()
  index.write_text("{broken")  # A damaged index is made again, not trusted.
  assert [c.file_name for c in dataset.read_cases(str(data), "test")] == \
      [c.file_name for c in first]
  # A shard rewritten in place (other size): the index no longer matches it.
  shard = folder / first[0].record.shard
  shard.write_bytes(shard.read_bytes()[:-10])
  with pytest.raises(records.RecordError, match="truncated record"):
    dataset.read_cases(str(data), "test")


def test_a_stale_location_is_an_error_naming_the_case(synthetic_layouts):
  cases = dataset.read_cases(synthetic_layouts[2], "train")
  a, b = cases[0], cases[1]
  moved = dataset.CaseInfo(**{**a.__dict__, "record": b.record})
  with pytest.raises(records.RecordError, match=f"not {a.file_name}"):
    dataset.RoiReader(synthetic_layouts[2])(moved)


def _first_batches(data_dir, n=2):
  config = tiny_config(data_dir, cache_bytes=1 << 30)
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  data = inputs.build(config, mesh)
  train = [b for _, b in zip(range(n), data.train.host_batches(0))]
  valid = list(data.valid.host_batches(0, epochs=1))
  return data, [{k: v.copy() for k, v in b.items()} for b in train + valid]


def test_training_and_validation_inputs_do_not_depend_on_the_layout(synthetic_layouts):
  one, batches_one = _first_batches(synthetic_layouts[1])
  seven, batches_seven = _first_batches(synthetic_layouts[7])
  assert one.meta == seven.meta
  np.testing.assert_array_equal(one.normalization.unit_mean, seven.normalization.unit_mean)
  assert len(batches_one) == len(batches_seven)
  for a, b in zip(batches_one, batches_seven):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_eval_runs_gives_the_same_report_on_every_layout(plan_runs, synthetic_layouts, tmp_path):
  reports = {}
  for n in (1, 7):
    root = tmp_path / f"runs{n}"
    shutil.copytree(plan_runs / "all_domains" / "fold0", root / "all_domains" / "fold0",
                    ignore=shutil.ignore_patterns("predictions", "evaluation.json"))
    runs.evaluate_all(str(root), str(tmp_path / f"report{n}"),
                          data_dir=synthetic_layouts[n], folds=(0,))
    reports[n] = (root / "all_domains" / "fold0" / "evaluation.json").read_text()
  assert reports[1] == reports[7]
  assert '"tp"' in reports[1]
