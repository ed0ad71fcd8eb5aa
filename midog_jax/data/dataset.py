"""Reads the `midogpp` TFDS dataset: case metadata and decoded ROIs.

Cases are found by identity, never by position: a split is scanned once
(`records.scan`), each case's record location (shard, byte offset) and
metadata are kept in a small index beside the dataset, and an ROI is read
by seeking to its record. Shard counts, TFDS's record order and reading
order therefore do not matter. Every record read is checked against its
CRCs, so a damaged shard is an error naming it, never silently wrong data.
TensorFlow is used only through TFDS to find the dataset; records are
parsed by TFDS's NumPy parser and PNGs decoded by imagecodecs, so what
comes out is NumPy, on the CPU.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Iterator, Sequence

import imagecodecs
import numpy as np
from etils import epath

from midog_jax import atomic
from midog_jax import domains
from midog_jax.data import annotations
from midog_jax.data import normalization
from midog_jax.data import records

DATASET = "midogpp"
_INDEX_VERSION = 1


@dataclasses.dataclass(frozen=True)
class CaseInfo:
  """A case's metadata and objects, as stored in the TFDS dataset."""
  file_name: str
  case_id: int
  split: str
  record: records.Location  # Where its example is, for reading the ROI alone.
  tumor: str
  domain: str
  width: int
  height: int
  um_per_px: float
  centers: np.ndarray  # float32 [M, 2], (x, y) pixels.
  labels: np.ndarray  # int64 [M], annotations.MITOTIC_FIGURE / NON_MITOTIC_FIGURE.
  tissue_mean: np.ndarray  # float32 [3], 0-255.
  tissue_std: np.ndarray
  tissue_fraction: float

  @property
  def id(self) -> int:  # Same names as `annotations.Case`, for `folds`.
    return self.case_id

  @property
  def mitotic_figures(self) -> np.ndarray:
    return self.centers[self.labels == annotations.MITOTIC_FIGURE]

  def to_json(self) -> dict:
    out = dataclasses.asdict(self)
    out["record"] = dataclasses.asdict(self.record)
    for k in ("centers", "labels", "tissue_mean", "tissue_std"):
      out[k] = getattr(self, k).tolist()
    return out

  @classmethod
  def from_json(cls, d: dict) -> "CaseInfo":
    return cls(**{**d, "record": records.Location(**d["record"]),
                  "centers": np.asarray(d["centers"], np.float32).reshape(-1, 2),
                  "labels": np.asarray(d["labels"], np.int64),
                  "tissue_mean": np.asarray(d["tissue_mean"], np.float32),
                  "tissue_std": np.asarray(d["tissue_std"], np.float32)})


def _tf():
  import tensorflow as tf  # Imported late: only finding the dataset needs it.
  tf.config.set_visible_devices([], "GPU")  # Keep TensorFlow off accelerators.
  return tf


def _builder(data_dir: str | None):
  _tf()
  import tensorflow_datasets as tfds
  import tfds_midogpp  # noqa: F401  Registers the builder.
  if data_dir and (epath.Path(data_dir).expanduser() / "dataset_info.json").exists():
    # A built dataset's own folder, e.g. a subset: .../midogpp/<config>/<version>.
    return tfds.builder_from_directory(os.fspath(epath.Path(data_dir).expanduser()))
  builder = tfds.builder(DATASET, data_dir=data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"the {DATASET} dataset is not built in {builder.data_dir}; run "
        f"`tfds build {DATASET} --imports tfds_midogpp [--manual_dir DIR]"
        + (f" --data_dir {data_dir}`" if data_dir else "`"))
  return builder


def _case_from_example(ex: dict, split: str, location: records.Location) -> CaseInfo:
  # The image's size without decoding it: the PNG header (IHDR) holds it.
  png = ex["image"]
  width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
  objects = ex["objects"]
  return CaseInfo(
      file_name=_text(ex["file_name"]), case_id=int(ex["case_id"]), split=split,
      record=location, tumor=domains.TUMOR_SLUGS[int(ex["tumor_type"])],
      domain=domains.DOMAIN_IDS[int(ex["domain"])], width=width, height=height,
      um_per_px=float(ex["um_per_px"]),
      centers=np.asarray(objects["center"], np.float32).reshape(-1, 2),
      labels=np.asarray(objects["label"], np.int64).reshape(-1),
      tissue_mean=np.asarray(ex["tissue"]["mean"], np.float32),
      tissue_std=np.asarray(ex["tissue"]["std"], np.float32),
      tissue_fraction=float(ex["tissue"]["fraction"]))


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def _shard_key(paths: Sequence[epath.Path]) -> list:
  """What identifies a build of the shards: names, sizes, modification times."""
  out = []
  for p in paths:
    st = p.stat()
    out.append([p.name, int(st.length), int(st.mtime)])
  return out


def _scan_split(builder, split: str, paths: Sequence[epath.Path]) -> list[CaseInfo]:
  import tensorflow_datasets as tfds
  from tqdm import tqdm
  features = builder.info.features
  skip = {"image": tfds.decode.SkipDecoding()}
  cases, seen = [], {}
  total = builder.info.splits[split].num_examples
  with tqdm(total=total, desc=f"index {split}", unit="case", leave=False) as bar:
    for path in paths:
      for location, data in records.scan(path):
        case = _case_from_example(features.deserialize_example_np(data, decoders=skip),
                                  split, location)
        if case.file_name in seen:
          raise ValueError(f"{builder.data_dir}: {case.file_name} is stored twice in the "
                           f"{split} split ({seen[case.file_name]} and {path.name}); rebuild it")
        seen[case.file_name] = path.name
        cases.append(case)
        bar.update(1)
  if len(cases) != total:
    raise records.RecordError(
        f"{builder.data_dir}: the {split} split holds {len(cases)} records, its "
        f"dataset_info.json says {total}; rebuild the dataset")
  return cases


def read_cases(data_dir: str | None, split: str) -> list[CaseInfo]:
  """Every case of a split with its metadata, without decoding any image.

  The first call scans the split's shards (a read of every record); the
  result is kept as `midog_jax-cases-<split>.json` beside the dataset and
  reused while the shards are unchanged.
  """
  builder = _builder(data_dir)
  folder = epath.Path(builder.data_dir)
  if split not in builder.info.splits:  # A subset build may lack a split.
    return []
  paths = builder.info.splits[split].filepaths
  key = _shard_key(paths)
  index_path = folder / f"midog_jax-cases-{split}.json"
  if index_path.exists():
    try:
      index = atomic.read_json(index_path)
      if index.get("version") == _INDEX_VERSION and index.get("shards") == key:
        return [CaseInfo.from_json(c) for c in index["cases"]]
    except (ValueError, KeyError, TypeError):
      pass  # A damaged or foreign index is made again.
  cases = sorted(_scan_split(builder, split, paths), key=lambda c: c.case_id)
  try:
    atomic.write_json(index_path, {"version": _INDEX_VERSION, "shards": key,
                                  "cases": [c.to_json() for c in cases]}, indent=None)
  except OSError as e:  # A read-only dataset: the index lives for this process only.
    logging.info("Could not keep the case index in %s (%s).", folder, e)
  return cases


def select_cases(cases: Sequence[CaseInfo], tumor_types=None, domain_ids=None,
                 file_names=None) -> list[CaseInfo]:
  """Filters cases; an empty result names the filter that emptied it."""
  out = list(cases)
  if not out:
    raise ValueError("no cases to select from (empty split?)")
  if tumor_types is not None:
    slugs = set(domains.parse_tumor_types(tumor_types))
    out = [c for c in out if c.tumor in slugs]
    if not out:
      raise ValueError(f"tumour types {sorted(slugs)} select no case")
  if domain_ids is not None:
    ids = {domains.domain(d).id for d in domain_ids}
    out = [c for c in out if c.domain in ids]
    if not out:
      raise ValueError(f"domains {sorted(ids)} select no case (after the tumour filter)")
  if file_names is not None:
    names = set(file_names)
    out = [c for c in out if c.file_name in names]
    if not out:
      raise ValueError(f"the {len(names)} listed case(s) select no case "
                       "(after the tumour and domain filters)")
  return out


def normalization_of(cases: Sequence[CaseInfo]) -> normalization.Normalization:
  """Tissue-area-weighted statistics over the given (training) cases."""
  return normalization.tissue_weighted(
      [c.tissue_mean for c in cases], [c.tissue_std for c in cases],
      [c.tissue_fraction * c.width * c.height for c in cases])


class RoiReader:
  """Decodes one case's ROI by seeking to its record (any shard layout)."""

  def __init__(self, data_dir: str | None):
    builder = _builder(data_dir)
    self._folder = epath.Path(builder.data_dir)
    self._features = builder.info.features

  @property
  def folder(self) -> str:
    """The built dataset's folder (its shards and the project's files)."""
    return os.fspath(self._folder)

  def __call__(self, case: CaseInfo) -> np.ndarray:
    import tensorflow_datasets as tfds
    data = records.read(self._folder, case.record, name=case.file_name)  # CRC-checked.
    ex = self._features.deserialize_example_np(
        data, decoders={"image": tfds.decode.SkipDecoding()})
    if _text(ex["file_name"]) != case.file_name:
      raise records.RecordError(
          f"{self._folder / case.record.shard}: the record at byte {case.record.offset} is "
          f"{_text(ex['file_name'])}, not {case.file_name}; the dataset changed since its "
          "index was made (delete the midog_jax-cases-*.json files beside it)")
    image = imagecodecs.png_decode(ex["image"])
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
      raise records.RecordError(f"{case.file_name}: stored image is {image.shape} "
                                f"{image.dtype}, expected [H, W, 3] uint8")
    return image


def iterate_rois(data_dir: str | None, cases: Sequence[CaseInfo]) -> Iterator[tuple[CaseInfo, np.ndarray]]:
  """The ROIs of the given cases, read in storage order (sequential I/O)."""
  reader = RoiReader(data_dir)
  for case in sorted(cases, key=lambda c: (c.split, c.record.shard, c.record.offset)):
    yield case, reader(case)
