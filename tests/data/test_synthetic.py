import json

import numpy as np
import pytest

from midog_jax import domains
from midog_jax import synthetic as synthetic_cli
from midog_jax.data import annotations
from midog_jax.data import roi_io
from midog_jax.data import synthetic
from tests.helpers import REAL_CSV, REAL_JSON, ROOT, needs_real_files


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory):
  out = tmp_path_factory.mktemp("synthetic")
  synthetic.write_dataset(str(out), 5, 256, 192, seed=3, density_scale=60, progress=False)
  return out


def test_same_seed_same_bytes(synthetic_set, tmp_path):
  assert synthetic_cli.main(["--out", str(tmp_path), "--cases-per-domain", "5", "--width", "256",
                         "--height", "192", "--seed", "3", "--density-scale", "60"]) == 0
  for name in ["MIDOG++.json", "datasets_xvalidation.csv", "images/001.tiff", "images/050.tiff"]:
    assert (tmp_path / name).read_bytes() == (synthetic_set / name).read_bytes(), name


def test_real_schema_and_split(synthetic_set):
  data = json.loads((synthetic_set / "MIDOG++.json").read_text())
  assert set(data) == {"info", "licenses", "images", "categories", "annotations"}
  if REAL_JSON.exists():
    real = json.loads(REAL_JSON.read_text())
    assert set(data["images"][0]) == set(real["images"][0])
    assert set(data["annotations"][0]) == set(real["annotations"][0])
    assert data["categories"] == real["categories"]
    assert (synthetic_set / "datasets_xvalidation.csv").read_text().splitlines()[0] == \
        REAL_CSV.read_text().splitlines()[0]
  csv_text = (synthetic_set / "datasets_xvalidation.csv").read_text()
  assert "Hamammatsu XR" in csv_text and "canine lymphoma" in csv_text
  assert any(i["tumor_type"] == "canine lymphosarcoma" for i in data["images"])
  for a in data["annotations"]:
    x1, y1, x2, y2 = a["bbox"]
    assert (x2 - x1, y2 - y1) == (50, 50)
  cases = annotations.load_cases(synthetic_set / "MIDOG++.json",
                                 synthetic_set / "datasets_xvalidation.csv")
  assert {c.domain for c in cases} == set(domains.DOMAIN_IDS)
  for d in domains.DOMAIN_IDS:
    assert sorted(c.split for c in cases if c.domain == d) == ["test"] + ["train"] * 4


def test_tiffs_in_real_format_with_resolution(synthetic_set):
  cases = annotations.load_cases(synthetic_set / "MIDOG++.json",
                                 synthetic_set / "datasets_xvalidation.csv")
  for c in cases[::7]:
    path = synthetic_set / "images" / c.file_name
    assert roi_io.read_roi(path, (c.width, c.height)).shape == (192, 256, 3)
    assert roi_io.read_um_per_px(path) == pytest.approx(domains.domain(c.domain).um_per_px)


def test_objects_look_as_described(synthetic_set):
  cases = annotations.load_cases(synthetic_set / "MIDOG++.json",
                                 synthetic_set / "datasets_xvalidation.csv")
  dark_mitotic, dark_background = [], []
  for c in cases:
    grey = roi_io.read_roi(synthetic_set / "images" / c.file_name).mean(-1)
    for o in c.mitotic_figures:
      y, x = int(o.y), int(o.x)
      dark_mitotic.append(grey[y - 8:y + 9, x - 8:x + 9].min())
    dark_background.append(np.median(grey))
  # Mitotic figures hold the darkest chromatin in the image.
  assert np.median(dark_mitotic) < np.median(dark_background) - 60


def test_counts_follow_table_2_proportions(tmp_path):
  cases = synthetic.write_dataset(str(tmp_path), 6, 320, 240, seed=0, density_scale=150,
                                  progress=False)
  per_domain = {d: sum(len(c.mitotic_figures) for c in cases if c.domain == d)
                for d in domains.DOMAIN_IDS}
  # Lymphoma (domain 3) is by far the most mitotically active, as in Table 2.
  assert per_domain["3"] == max(per_domain.values())
  assert per_domain["3"] > 2 * per_domain["1a"]


@needs_real_files
def test_layout_from_real_annotations(tmp_path):
  cases = synthetic.write_dataset(str(tmp_path), 1, 721, 541, layout_from=str(REAL_JSON),
                                  progress=False)
  real = annotations.load_cases(REAL_JSON, REAL_CSV)
  first_breast = next(c for c in real if c.domain == "1a")
  assert len(cases[0].objects) == len(first_breast.objects)
  o, r = cases[0].objects[0], first_breast.objects[0]
  assert abs(o.x - r.x * 721 / first_breast.width) <= 0.5
  assert o.label == r.label and o.votes == r.votes


def test_dummy_data_is_made_by_the_writer(tmp_path):
  dummy = ROOT / "tfds_midogpp" / "midogpp" / "dummy_data"
  synthetic.write_dataset(str(tmp_path), 2, 112, 84, seed=0, density_scale=300, progress=False)
  files = sorted(p.relative_to(dummy) for p in dummy.rglob("*") if p.is_file())
  assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
  for f in files:
    assert (dummy / f).read_bytes() == (tmp_path / f).read_bytes(), f
  assert sum((dummy / f).stat().st_size for f in files) < 1_000_000
