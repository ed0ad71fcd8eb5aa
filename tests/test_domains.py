import csv

import pytest

from midog_jax import domains
from tests.helpers import REAL_CSV, REAL_JSON, needs_real_files


def test_registry_shape():
  assert len(domains.TUMOR_TYPES) == 7
  assert domains.DOMAIN_IDS == ("1a", "1b", "1c", "2", "3", "4", "5", "6a", "6b", "7")
  assert sum(d.cases for d in domains.DOMAINS) == 503
  assert sum(d.mitotic_figures for d in domains.DOMAINS) == 11_937
  # Table 2 prints 14,351; the annotation file holds 14,349.
  assert sum(d.non_mitotic_figures for d in domains.DOMAINS) == 14_349


@pytest.mark.parametrize("spelling,slug", [
    ("canine lymphosarcoma", "canine_lymphoma"),
    ("canine lymphoma", "canine_lymphoma"),
    ("Canine_Lymphoma", "canine_lymphoma"),
    ("lymphosarcoma", "canine_lymphoma"),
    ("human breast cancer", "human_breast_carcinoma"),
    ("breast carcinoma (human)", "human_breast_carcinoma"),
])
def test_tumor_spellings(spelling, slug):
  assert domains.tumor_type(spelling).slug == slug


def test_scanner_spellings_and_unknowns():
  assert domains.scanner("Hamammatsu XR").slug == "hamamatsu_xr"
  assert domains.scanner("Hamamatsu XR (C12000-22)").slug == "hamamatsu_xr"
  assert domains.scanner("Leica ScanScope CS2").slug == "aperio_cs2"
  with pytest.raises(KeyError, match="unknown scanner"):
    domains.scanner("Philips UFS")
  with pytest.raises(KeyError, match="unknown tumour type"):
    domains.tumor_type("feline lymphoma")


def test_parse_tumor_types():
  assert domains.parse_tumor_types("all") == domains.TUMOR_SLUGS
  assert domains.parse_tumor_types("human melanoma,canine lymphosarcoma") == (
      "canine_lymphoma", "human_melanoma")


@needs_real_files
def test_every_real_spelling_is_known():
  import json
  with open(REAL_JSON) as f:
    for image in json.load(f)["images"]:
      domains.tumor_type(image["tumor_type"])
  with open(REAL_CSV, newline="") as f:
    counts = {}
    for row in csv.DictReader(f, delimiter=";"):
      d = domains.find_domain(row["Tumor"], row["Scanner"], row["Origin"])
      assert d.species == row["Species"].lower()
      counts[d.id] = counts.get(d.id, 0) + 1
  assert counts == {d.id: d.cases for d in domains.DOMAINS}
