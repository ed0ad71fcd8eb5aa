"""MIDOG++ annotations: `MIDOG++.json` + `datasets_xvalidation.csv` -> cases.

The JSON holds images and their objects (boxes are [x1, y1, x2, y2] pixels,
50 x 50 around the object); the CSV holds each case's split, scanner and lab.
Images without a CSV row (ids 151-200, not part of MIDOG++) are left out.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
from typing import Any, Sequence

from midog_jax import domains

MITOTIC_FIGURE = 1  # `category_id` of a mitotic figure in the JSON.
NON_MITOTIC_FIGURE = 2  # `category_id` of a hard negative ("imposter").
LABELS = (MITOTIC_FIGURE, NON_MITOTIC_FIGURE)
BOX_SIZE = 50  # Every annotation box is 50 x 50 px around its object.
SPLITS = ("train", "test")
CSV_COLUMNS = ("Slide", "Dataset", "Tumor", "Scanner", "Origin", "Species")


class AnnotationError(ValueError):
  """Malformed annotation or split file; the message names file and record."""


@dataclasses.dataclass(frozen=True)
class MidogObject:
  """One annotated object: its centre in pixels, consensus label and votes."""
  id: int
  x: float
  y: float
  label: int  # MITOTIC_FIGURE or NON_MITOTIC_FIGURE.
  votes: tuple[int, ...]  # The experts' individual labels, same coding.

  @property
  def is_mitotic(self) -> bool:
    return self.label == MITOTIC_FIGURE


@dataclasses.dataclass(frozen=True)
class Case:
  """One MIDOG++ case (a region of interest) with its metadata and objects."""
  id: int
  file_name: str
  width: int
  height: int
  tumor: str  # Tumour type slug, see `domains`.
  domain: str  # Domain id, "1a" ... "7".
  split: str  # "train" or "test".
  um_per_px: float
  objects: tuple[MidogObject, ...]

  @property
  def mitotic_figures(self) -> tuple[MidogObject, ...]:
    return tuple(o for o in self.objects if o.is_mitotic)

  @property
  def non_mitotic_figures(self) -> tuple[MidogObject, ...]:
    return tuple(o for o in self.objects if not o.is_mitotic)

  @property
  def domain_info(self) -> domains.Domain:
    return domains.domain(self.domain)


def _require(record: dict[str, Any], keys: Sequence[str], where: str) -> None:
  if not isinstance(record, dict):
    raise AnnotationError(f"{where}: expected a JSON object, got {type(record).__name__}")
  missing = [k for k in keys if k not in record]
  if missing:
    raise AnnotationError(f"{where}: missing key(s) {missing}")


def read_splits(path: str | os.PathLike[str]) -> dict[int, dict[str, str]]:
  """Reads the split CSV into {slide id: row}; checks columns and spellings."""
  path = os.fspath(path)
  try:
    with open(path, newline="", encoding="utf-8") as f:
      rows = list(csv.DictReader(f, delimiter=";"))
      fields = rows and list(rows[0].keys())
  except FileNotFoundError:
    raise AnnotationError(
        f"{path}: split file not found; pass the path of "
        "datasets_xvalidation.csv from the MIDOG++ repository") from None
  except IsADirectoryError:
    raise AnnotationError(f"{path} is a folder; pass the path of the file "
                          f"{os.path.join(path, 'datasets_xvalidation.csv')}") from None
  except UnicodeDecodeError as e:
    raise AnnotationError(f"{path}: not a text file ({e.reason}); pass "
                          "datasets_xvalidation.csv") from None
  if not rows or any(c not in fields for c in CSV_COLUMNS):
    raise AnnotationError(
        f"{path}: expected a ';'-separated header {';'.join(CSV_COLUMNS)}, "
        f"got {fields}")
  out: dict[int, dict[str, str]] = {}
  for line, row in enumerate(rows, start=2):
    where = f"{path}, line {line}"
    try:
      slide = int(row["Slide"])
    except (TypeError, ValueError):
      raise AnnotationError(f"{where}: Slide {row['Slide']!r} is not an integer") from None
    if slide in out:
      raise AnnotationError(f"{where}: duplicate Slide {slide}")
    if row["Dataset"] not in SPLITS:
      raise AnnotationError(f"{where}: Dataset {row['Dataset']!r} is neither 'train' nor 'test'")
    try:
      domains.find_domain(row["Tumor"], row["Scanner"], row["Origin"])
    except KeyError as e:
      raise AnnotationError(f"{where}: {e.args[0]}") from None
    out[slide] = row
  return out


def _parse_object(ann: dict[str, Any], image: dict[str, Any], where: str) -> MidogObject:
  _require(ann, ("id", "image_id", "bbox", "category_id", "labels"), where)
  bbox = ann["bbox"]
  if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4):
    raise AnnotationError(f"{where}: bbox {bbox!r} is not [x1, y1, x2, y2]")
  x1, y1, x2, y2 = (_number(v, where, "bbox value") for v in bbox)
  if abs(x2 - x1 - BOX_SIZE) > 1e-3 or abs(y2 - y1 - BOX_SIZE) > 1e-3:
    raise AnnotationError(
        f"{where}: bbox {bbox} is {x2 - x1:g} x {y2 - y1:g} px, expected "
        f"{BOX_SIZE} x {BOX_SIZE} as [x1, y1, x2, y2]")
  # A few real boxes stick out over the border; only a box with no overlap
  # with its image is an error.
  if x2 <= 0 or y2 <= 0 or x1 >= image["width"] or y1 >= image["height"]:
    raise AnnotationError(
        f"{where}: bbox {bbox} lies outside its image "
        f"({image['file_name']}, {image['width']} x {image['height']} px)")
  label = ann["category_id"]
  votes = tuple(ann["labels"]) if isinstance(ann["labels"], (list, tuple)) else None
  if label not in LABELS or not votes or any(v not in LABELS for v in votes):
    raise AnnotationError(
        f"{where}: category_id {label!r} / labels {ann['labels']!r} must use "
        f"{MITOTIC_FIGURE} (mitotic) or {NON_MITOTIC_FIGURE} (non-mitotic)")
  return MidogObject(int(ann["id"]), (x1 + x2) / 2, (y1 + y2) / 2, int(label), votes)


def _number(value: Any, where: str, what: str) -> float:
  """A finite JSON number (not a string, bool, null or NaN)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise AnnotationError(f"{where}: {what} {value!r} is not a finite number")
  return float(value)


def _integer(value: Any, where: str, what: str, minimum: int | None = None) -> int:
  if isinstance(value, bool) or not isinstance(value, int):
    raise AnnotationError(f"{where}: {what} {value!r} is not an integer")
  if minimum is not None and value < minimum:
    raise AnnotationError(f"{where}: {what} {value} is below {minimum}")
  return value


def load_cases(
    annotations: str | os.PathLike[str],
    splits: str | os.PathLike[str],
    um_per_px: dict[str, float] | None = None,
) -> list[Case]:
  """Loads every MIDOG++ case, in case-id order.

  Args:
    annotations: path of `MIDOG++.json`.
    splits: path of `datasets_xvalidation.csv`.
    um_per_px: optional {file name: measured µm/px} (e.g. from the TIFFs'
      resolution tags); other cases get their scanner's nominal value.
  """
  annotations, um_per_px = os.fspath(annotations), um_per_px or {}
  rows = read_splits(splits)
  try:
    with open(annotations, encoding="utf-8") as f:
      data = json.load(f)
  except FileNotFoundError:
    raise AnnotationError(
        f"{annotations}: annotation file not found; pass the path of MIDOG++.json") from None
  except IsADirectoryError:
    raise AnnotationError(f"{annotations} is a folder; pass the path of the file "
                          f"{os.path.join(annotations, 'MIDOG++.json')}") from None
  except json.JSONDecodeError as e:
    raise AnnotationError(f"{annotations}: not valid JSON ({e})") from None
  if not isinstance(data, dict):
    raise AnnotationError(f"{annotations}: expected a JSON object with 'images' and 'annotations'")
  _require(data, ("images", "annotations"), annotations)
  for key in ("images", "annotations"):
    if not isinstance(data[key], list):
      raise AnnotationError(f"{annotations}: '{key}' must be a list of records, got "
                            f"{json.dumps(data[key])[:40]}")

  images: dict[int, dict[str, Any]] = {}
  names: dict[str, int] = {}
  for i, image in enumerate(data["images"]):
    where = f"{annotations}, images[{i}]"
    _require(image, ("id", "file_name", "width", "height", "tumor_type"), where)
    _integer(image["id"], where, "id")
    _integer(image["width"], where, "width", minimum=1)
    _integer(image["height"], where, "height", minimum=1)
    if not isinstance(image["file_name"], str) or not image["file_name"]:
      raise AnnotationError(f"{where}: file_name {image['file_name']!r} is not a file name")
    if image["id"] in images:
      raise AnnotationError(f"{where}: duplicate image id {image['id']}")
    if image["file_name"] in names:
      raise AnnotationError(f"{where}: file_name {image['file_name']} is also image "
                            f"{names[image['file_name']]}")
    names[image["file_name"]] = image["id"]
    try:
      domains.tumor_type(image["tumor_type"])
    except KeyError as e:
      raise AnnotationError(f"{where}: {e.args[0]}") from None
    images[image["id"]] = image

  objects: dict[int, list[MidogObject]] = {i: [] for i in images}
  seen: set[int] = set()
  for i, ann in enumerate(data["annotations"]):
    where = f"{annotations}, annotations[{i}]"
    _require(ann, ("id", "image_id"), where)
    where += f" (id {ann.get('id')})"
    _integer(ann["id"], where, "id")
    if ann["id"] in seen:
      raise AnnotationError(f"{where}: duplicate annotation id {ann['id']}")
    seen.add(ann["id"])
    if ann["image_id"] not in images:
      raise AnnotationError(f"{where}: image_id {ann['image_id']} points to no image")
    objects[ann["image_id"]].append(_parse_object(ann, images[ann["image_id"]], where))

  cases, left_out = [], []
  for image_id in sorted(images):
    image = images[image_id]
    row = rows.get(image_id)
    if row is None:
      left_out.append(image_id)
      continue
    domain = domains.find_domain(row["Tumor"], row["Scanner"], row["Origin"])
    if domains.tumor_type(image["tumor_type"]) != domain.tumor:
      raise AnnotationError(
          f"{annotations}: image {image_id} ({image['file_name']}) is "
          f"{image['tumor_type']!r} but {os.fspath(splits)} says {row['Tumor']!r}")
    cases.append(Case(
        id=image_id, file_name=image["file_name"], width=int(image["width"]),
        height=int(image["height"]), tumor=domain.tumor.slug, domain=domain.id,
        split=row["Dataset"],
        um_per_px=float(um_per_px.get(image["file_name"], domain.um_per_px)),
        objects=tuple(objects[image_id])))
  orphans = sorted(set(rows) - set(images))
  if orphans:
    raise AnnotationError(
        f"{os.fspath(splits)}: slide(s) {orphans[:10]} have no image in {annotations}")
  if left_out:
    with_objects = [i for i in left_out if objects[i]]
    logging.info(
        "Left out %d image(s) without a row in the split file (ids %s); "
        "%d of them had annotations.", len(left_out), _ranges(left_out), len(with_objects))
  return cases


def _ranges(ids: Sequence[int]) -> str:
  """[151, 152, ..., 200, 300] -> '151-200, 300'."""
  out, start = [], None
  for k, i in enumerate(ids):
    if start is None:
      start = i
    if k + 1 == len(ids) or ids[k + 1] != i + 1:
      out.append(f"{start}-{i}" if i != start else f"{i}")
      start = None
  return ", ".join(out)


def select(cases: Sequence[Case], split: str | None = None,
           tumors: Sequence[str] | None = None) -> list[Case]:
  """Cases of a split and/or tumour types (any spelling)."""
  slugs = set(domains.parse_tumor_types(tumors)) if tumors is not None else None
  return [c for c in cases if (split is None or c.split == split)
          and (slugs is None or c.tumor in slugs)]
