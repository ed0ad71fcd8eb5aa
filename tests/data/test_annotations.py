import copy
import json
import logging

import pytest

from midog_jax.data import annotations
from tests.helpers import REAL_CSV, REAL_JSON, needs_real_files

_CSV = ("Slide;Dataset;Tumor;Scanner;Origin;Species\n"
        "1;train;human breast cancer;Hamammatsu XR;UMC Utrecht;Human\n"
        "2;test;canine lymphoma;3D Histech;VMU Vienna;Canine\n")
_JSON = {
    "images": [
        {"id": 1, "file_name": "001.tiff", "width": 200, "height": 100,
         "tumor_type": "human breast cancer"},
        {"id": 2, "file_name": "002.tiff", "width": 200, "height": 100,
         "tumor_type": "canine lymphosarcoma"},
        {"id": 3, "file_name": "003.tiff", "width": 200, "height": 100,
         "tumor_type": "human breast cancer"},
    ],
    "annotations": [
        {"id": 1, "image_id": 1, "bbox": [10, 20, 60, 70], "category_id": 1, "labels": [1, 1]},
        {"id": 2, "image_id": 1, "bbox": [-20, 5.5, 30, 55.5], "category_id": 2,
         "labels": [1, 2, 2]},
        {"id": 3, "image_id": 2, "bbox": [100, 50, 150, 100], "category_id": 2, "labels": [2, 2]},
    ],
}


def _write(tmp_path, data=None, csv_text=_CSV):
  j, c = tmp_path / "MIDOG++.json", tmp_path / "splits.csv"
  j.write_text(json.dumps(data if data is not None else _JSON))
  c.write_text(csv_text)
  return j, c


def test_small_file(tmp_path, caplog):
  with caplog.at_level(logging.INFO):
    cases = annotations.load_cases(*_write(tmp_path))
  assert [c.id for c in cases] == [1, 2]
  a, b = cases
  assert (a.tumor, a.domain, a.split, a.um_per_px) == ("human_breast_carcinoma", "1a", "train", 0.23)
  assert (b.tumor, b.domain, b.split, b.um_per_px) == ("canine_lymphoma", "3", "test", 0.25)
  assert a.objects[0] == annotations.MidogObject(1, 35.0, 45.0, 1, (1, 1))
  assert a.objects[1] == annotations.MidogObject(2, 5.0, 30.5, 2, (1, 2, 2))
  assert len(a.mitotic_figures) == 1 and len(a.non_mitotic_figures) == 1
  assert "Left out 1 image(s)" in caplog.text and "ids 3" in caplog.text


def test_measured_resolution_overrides_nominal(tmp_path):
  cases = annotations.load_cases(*_write(tmp_path), um_per_px={"001.tiff": 0.2274})
  assert cases[0].um_per_px == 0.2274 and cases[1].um_per_px == 0.25


def _broken(mutate):
  data = copy.deepcopy(_JSON)
  mutate(data)
  return data


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d["annotations"][0].pop("bbox"), r"annotations\[0\].*missing key\(s\) \['bbox'\]"),
    (lambda d: d["images"][1].pop("width"), r"images\[1\].*missing key\(s\) \['width'\]"),
    (lambda d: d["annotations"][0].update(bbox=[10, 20, 50, 50]), r"annotations\[0\].*40 x 30 px"),
    (lambda d: d["annotations"][0].update(bbox=[10, 20, 60]), r"not \[x1, y1, x2, y2\]"),
    (lambda d: d["annotations"][0].update(bbox=[200, 20, 250, 70]), "lies outside its image"),
    (lambda d: d["images"][0].update(tumor_type="feline lymphoma"), "unknown tumour type 'feline lymphoma'"),
    (lambda d: d["annotations"][1].update(id=1), "duplicate annotation id 1"),
    (lambda d: d["images"][2].update(id=2), "duplicate image id 2"),
    (lambda d: d["annotations"][2].update(image_id=9), "image_id 9 points to no image"),
    (lambda d: d["annotations"][2].update(category_id=3), "category_id 3"),
    (lambda d: d["images"][1].update(tumor_type="human melanoma"), "says 'canine lymphoma'"),
    (lambda d: d["annotations"][0].update(bbox=[float("nan"), 20, 60, 70]), "bbox value nan is not a finite number"),
    (lambda d: d["annotations"][0].update(bbox=["10", 20, 60, 70]), "bbox value '10' is not a finite number"),
    (lambda d: d["images"][0].update(width="200"), r"images\[0\]: width '200' is not an integer"),
    (lambda d: d["annotations"][0].update(id="a"), r"annotations\[0\] \(id a\): id 'a' is not an integer"),
    (lambda d: d.update(annotations={}), "'annotations' must be a list of records, got {}"),
    (lambda d: d.update(images=None), "'images' must be a list of records, got null"),
    (lambda d: d["images"][2].update(file_name="001.tiff"), r"images\[2\]: file_name 001.tiff is also image 1"),
    (lambda d: d["annotations"].append(7), r"annotations\[3\]: expected a JSON object, got int"),
])
def test_malformed_json(tmp_path, mutate, message):
  j, c = _write(tmp_path, _broken(mutate))
  with pytest.raises(annotations.AnnotationError, match=message) as e:
    annotations.load_cases(j, c)
  assert str(j) in str(e.value)


@pytest.mark.parametrize("csv_text,message", [
    (_CSV.replace("Hamammatsu XR", "Philips UFS"), r"line 2: unknown scanner 'Philips UFS'"),
    (_CSV.replace("canine lymphoma", "feline lymphoma"), r"line 3: unknown tumour type"),
    (_CSV.replace("2;test", "1;test"), "line 3: duplicate Slide 1"),
    (_CSV.replace("2;test", "2;valid"), "Dataset 'valid'"),
    (_CSV.replace(";", ","), "expected a ';'-separated header"),
    (_CSV + "9;train;human melanoma;Hamammatsu XR;UMC Utrecht;Human\n", r"slide\(s\) \[9\] have no image"),
])
def test_malformed_csv(tmp_path, csv_text, message):
  j, c = _write(tmp_path, csv_text=csv_text)
  with pytest.raises(annotations.AnnotationError, match=message) as e:
    annotations.load_cases(j, c)
  assert "splits.csv" in str(e.value)


def test_missing_and_invalid_files(tmp_path):
  j, c = _write(tmp_path)
  with pytest.raises(annotations.AnnotationError, match="annotation file not found"):
    annotations.load_cases(tmp_path / "nope.json", c)
  with pytest.raises(annotations.AnnotationError, match="split file not found"):
    annotations.load_cases(j, tmp_path / "nope.csv")
  j.write_text("{not json")
  with pytest.raises(annotations.AnnotationError, match="not valid JSON"):
    annotations.load_cases(j, c)
  with pytest.raises(annotations.AnnotationError,
                     match=f"{tmp_path} is a folder; pass the path of the file .*MIDOG\\+\\+.json"):
    annotations.load_cases(tmp_path, c)
  with pytest.raises(annotations.AnnotationError,
                     match=f"{tmp_path} is a folder; .*datasets_xvalidation.csv"):
    annotations.load_cases(j, tmp_path)
  c.write_bytes(b"\xff\xfe\x00binary")
  with pytest.raises(annotations.AnnotationError, match="not a text file"):
    annotations.load_cases(j, c)


@needs_real_files
def test_real_files(caplog):
  with caplog.at_level(logging.INFO):
    cases = annotations.load_cases(REAL_JSON, REAL_CSV)
  assert len(cases) == 503
  assert sum(c.split == "train" for c in cases) == 392
  assert sum(c.split == "test" for c in cases) == 111
  assert sum(len(c.objects) for c in cases) == 26_286
  assert sum(len(c.mitotic_figures) for c in cases) == 11_937
  assert all(151 > c.id or c.id > 200 for c in cases)
  assert "Left out 50 image(s)" in caplog.text and "151-200" in caplog.text
  assert {len(o.votes) for c in cases for o in c.objects} == {2, 3}
  assert max(len(c.objects) for c in cases) == 443
