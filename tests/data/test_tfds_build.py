"""Builds `midogpp` with the real `tfds build` command from synthetic files."""

import hashlib
import json
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from midog_jax import domains
from midog_jax.data import annotations
from midog_jax.data import roi_io
from midog_jax.data import synthetic
from tests.helpers import REAL, ROOT, env_without_accelerators
from tfds_midogpp.midogpp import midogpp_dataset_builder as builder_lib
from tfds_midogpp.midogpp import sources

tfds.core.utils.gcs_utils._is_gcs_disabled = True  # No network here.


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  manual = tmp_path_factory.mktemp("manual")
  data_dir = tmp_path_factory.mktemp("tfds")
  synthetic.write_dataset(str(manual), 2, 160, 120, seed=5, density_scale=150, progress=False)
  tfds_cli = pathlib.Path(sys.executable).parent / "tfds"
  proc = subprocess.run(
      [str(tfds_cli), "build", "midogpp", "--imports", "tfds_midogpp",
       "--manual_dir", str(manual), "--data_dir", str(data_dir)],
      capture_output=True, text=True, env=env_without_accelerators(), timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return manual, data_dir


def test_round_trip_against_json(built):
  manual, data_dir = built
  cases = {c.file_name: c for c in annotations.load_cases(
      manual / "MIDOG++.json", manual / "datasets_xvalidation.csv")}
  raw = {a["id"]: a for a in json.loads((manual / "MIDOG++.json").read_text())["annotations"]}
  seen = set()
  for split in ("train", "test"):
    ds = tfds.load("midogpp", split=split, data_dir=str(data_dir))
    for ex in tfds.as_numpy(ds):
      name = ex["file_name"].decode()
      case = cases[name]
      seen.add(name)
      assert case.split == split
      image = roi_io.read_roi(manual / "images" / name)
      np.testing.assert_array_equal(ex["image"], image)  # Lossless.
      d = domains.domain(case.domain)
      assert ex["case_id"] == case.id
      assert domains.TUMOR_SLUGS[ex["tumor_type"]] == d.tumor.slug
      assert domains.DOMAIN_IDS[ex["domain"]] == d.id
      assert (ex["scanner"].decode(), ex["lab"].decode(), ex["species"].decode()) == \
          (d.scanner.name, d.lab, d.species)
      assert ex["um_per_px"] == pytest.approx(d.um_per_px, rel=1e-6)
      objects = ex["objects"]
      assert len(objects["id"]) == len(case.objects)
      for k, oid in enumerate(objects["id"]):
        a = raw[int(oid)]
        x1, y1, x2, y2 = a["bbox"]
        assert tuple(objects["center"][k]) == ((x1 + x2) / 2, (y1 + y2) / 2)
        assert objects["label"][k] == a["category_id"]
        votes = objects["votes"][k]
        assert list(votes[votes > 0]) == a["labels"]
        np.testing.assert_allclose(
            objects["bbox"][k],
            np.clip([y1 / 120, x1 / 160, y2 / 120, x2 / 160], 0, 1), atol=1e-6)
      assert 0 < ex["tissue"]["fraction"] <= 1
      assert (ex["tissue"]["std"] > 0).all()
  assert seen == set(cases)


def _canonical_records(folder: pathlib.Path) -> dict:
  """{split: [example features]} in storage order across its shards.

  Protocol buffers serialise map fields in an order that may change between
  processes, so records are compared field by field, not byte by byte.
  TFDS's own writer and its Beam writer cut shards at other places; the
  project reads any shard layout, so the order across shards is what counts.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from midog_jax.data import records  # pylint: disable=g-import-not-at-top
  out = {}
  for shard in sorted(folder.glob("*.tfrecord-*")):
    split = shard.name.split(".tfrecord")[0]
    for _, raw in records.scan(shard):
      feature = tf.train.Example.FromString(raw).features.feature
      out.setdefault(split, []).append(sorted(
          (k, v.SerializeToString(deterministic=True)) for k, v in feature.items()))
  return out


def test_beam_build_with_two_worker_processes_has_the_same_examples(built, tmp_path):
  manual, data_dir = built
  tfds_cli = pathlib.Path(sys.executable).parent / "tfds"
  proc = subprocess.run(
      [str(tfds_cli), "build", "midogpp", "--imports", "tfds_midogpp",
       "--manual_dir", str(manual), "--data_dir", str(tmp_path / "data2"),
       "--beam_pipeline_options=direct_num_workers=2,direct_running_mode=multi_processing"],
      capture_output=True, text=True, env=env_without_accelerators(), timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for notice in ("beam_runner", "Converting string literal", "has no dataset_info.json"):
    assert notice not in proc.stderr, notice
  one = data_dir / "midogpp" / "full" / "1.1.0"
  two = tmp_path / "data2" / "midogpp" / "full" / "1.1.0"
  a, b = _canonical_records(one), _canonical_records(two)
  assert sum(map(len, a.values())) == 20 and a == b
  info_one, info_two = (tfds.builder_from_directory(str(f)).info for f in (one, two))
  assert info_one.features.to_json() == info_two.features.to_json()
  assert {s: i.num_examples for s, i in info_one.splits.items()} == {
      s: i.num_examples for s, i in info_two.splits.items()}


def test_tissue_statistics_match_numpy(built):
  manual, data_dir = built
  ex = next(iter(tfds.as_numpy(tfds.load("midogpp", split="train", data_dir=str(data_dir)))))
  image = roi_io.read_roi(manual / "images" / ex["file_name"].decode())
  from midog_jax.data import normalization
  mask = normalization.tissue_mask(image[::4, ::4])
  np.testing.assert_allclose(ex["tissue"]["mean"], image[::4, ::4][mask].mean(0), rtol=1e-5)
  assert ex["tissue"]["fraction"] == pytest.approx(mask.mean())


def test_checksums_pin_the_real_files():
  lines = (ROOT / "tfds_midogpp/midogpp/checksums.tsv").read_text().splitlines()
  entries = {l.split("\t")[0]: l.split("\t")[1:] for l in lines}
  assert set(entries) == {builder_lib.ANNOTATIONS_URL, builder_lib.SPLITS_URL}
  for url, name in ((builder_lib.ANNOTATIONS_URL, "MIDOG++.json"),
                    (builder_lib.SPLITS_URL, "datasets_xvalidation.csv")):
    size, sha, _ = entries[url]
    path = REAL / name
    if path.exists():
      data = path.read_bytes()
      assert (int(size), sha) == (len(data), hashlib.sha256(data).hexdigest())


# --- Bad input stops the build with a message naming the file. ---------------

@pytest.fixture()
def small_manual(tmp_path):
  manual = tmp_path / "manual"
  synthetic.write_dataset(str(manual), 1, 96, 72, seed=1, progress=False)
  return manual


def _build(manual, tmp_path):
  builder = builder_lib.Builder(data_dir=str(tmp_path / "data"))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  return builder


def test_images_directly_in_manual_dir(small_manual, tmp_path):
  for f in (small_manual / "images").iterdir():
    shutil.move(f, small_manual / f.name)
  (small_manual / "images").rmdir()
  builder = _build(small_manual, tmp_path)
  assert builder.info.splits["train"].num_examples == 10


def test_missing_tiffs_offline_are_listed_at_once_before_any_work(small_manual, tmp_path,
                                                                  monkeypatch):
  monkeypatch.setenv(sources.IMAGES_URL_ENV, f"http://127.0.0.1:{_closed_port()}/files/")
  for name in ("004.tiff", "009.tiff"):
    (small_manual / "images" / name).unlink()
  t = time.perf_counter()
  with pytest.raises(ConnectionError, match=r"cannot reach 127.0.0.1 to download 2 images "
                     r"\(004.tiff, 009.tiff\).*put the files in .*images and run the build"):
    _build(small_manual, tmp_path)
  assert time.perf_counter() - t < 30
  assert not (tmp_path / "data" / "midogpp" / "full" / "1.1.0").exists()


def _closed_port() -> int:
  import socket
  with socket.socket() as s:  # A port on this machine that nothing listens on.
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_offline_without_annotation_files_fails_within_seconds(small_manual, tmp_path, monkeypatch):
  monkeypatch.setenv(sources.ANNOTATIONS_URL_ENV, f"http://127.0.0.1:{_closed_port()}/")
  (small_manual / "MIDOG++.json").unlink()
  t = time.perf_counter()
  with pytest.raises(ConnectionError, match=r"cannot reach 127.0.0.1.*put the files in the "
                     r"manual folder"):
    _build(small_manual, tmp_path)
  assert time.perf_counter() - t < 30


def test_truncated_tiff(small_manual, tmp_path):
  path = small_manual / "images" / "004.tiff"
  path.write_bytes(path.read_bytes()[:5000])
  with pytest.raises(roi_io.RoiError, match="004.tiff.*truncated"):
    _build(small_manual, tmp_path)


def test_not_a_tiff(small_manual, tmp_path):
  (small_manual / "images" / "004.tiff").write_bytes(b"<html>Rate limit exceeded</html>")
  with pytest.raises(roi_io.RoiError, match="004.tiff: not a readable TIFF"):
    _build(small_manual, tmp_path)


def test_size_differs_from_annotations(small_manual, tmp_path):
  roi_io.write_roi(small_manual / "images" / "004.tiff", np.zeros((70, 96, 3), np.uint8), 0.25)
  with pytest.raises(roi_io.RoiError, match="004.tiff: image is 96 x 70 px but the annotations say 96 x 72"):
    _build(small_manual, tmp_path)


def test_tfds_command_line_errors_are_one_line(small_manual, tmp_path):
  path = small_manual / "images" / "007.tiff"
  path.write_bytes(path.read_bytes()[:-500])
  tfds_cli = pathlib.Path(sys.executable).parent / "tfds"
  proc = subprocess.run(
      [str(tfds_cli), "build", "midogpp", "--imports", "tfds_midogpp",
       "--manual_dir", str(small_manual), "--data_dir", str(tmp_path / "data")],
      capture_output=True, text=True, env=env_without_accelerators(), timeout=600)
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
  assert proc.stderr.strip().splitlines()[-1].endswith(
      "007.tiff: 500 bytes of image data are missing; the file is truncated. Download it again.")
