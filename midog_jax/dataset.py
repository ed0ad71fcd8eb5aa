"""Reads the `midogpp` TFDS dataset: case metadata and decoded ROIs.

TensorFlow is used here only to read and decode records, on the CPU. What
comes out is NumPy, so the sampler, the cache and everything after them run
without TensorFlow.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np

from midog_jax import annotations
from midog_jax import domains
from midog_jax import normalization

DATASET = "midogpp"


@dataclasses.dataclass(frozen=True)
class CaseInfo:
  """A case's metadata and objects, as stored in the TFDS dataset."""
  file_name: str
  case_id: int
  split: str
  index: int  # Position in its split, for reading the ROI alone.
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


def _tf():
  import tensorflow as tf  # Imported late: only this module needs it.
  tf.config.set_visible_devices([], "GPU")  # Keep TensorFlow off accelerators.
  return tf


def _builder(data_dir: str | None):
  _tf()
  import tensorflow_datasets as tfds
  import tfds_midogpp  # noqa: F401  Registers the builder.
  builder = tfds.builder(DATASET, data_dir=data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"the {DATASET} dataset is not built in {builder.data_dir}; run "
        f"`tfds build {DATASET} --imports tfds_midogpp --manual_dir DIR"
        + (f" --data_dir {data_dir}`" if data_dir else "`"))
  return builder


def read_cases(data_dir: str | None, split: str) -> list[CaseInfo]:
  """Every case of a split with its metadata, without decoding any image."""
  import tensorflow_datasets as tfds
  builder = _builder(data_dir)
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={"image": tfds.decode.SkipDecoding()})
  cases = []
  for index, ex in enumerate(tfds.as_numpy(ds)):
    # The image's size without decoding it: the PNG header (IHDR) holds it.
    png = ex["image"]
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    cases.append(CaseInfo(
        file_name=ex["file_name"].decode(), case_id=int(ex["case_id"]), split=split,
        index=index, tumor=domains.TUMOR_SLUGS[ex["tumor_type"]],
        domain=domains.DOMAIN_IDS[ex["domain"]], width=width, height=height,
        um_per_px=float(ex["um_per_px"]),
        centers=ex["objects"]["center"].astype(np.float32).reshape(-1, 2),
        labels=ex["objects"]["label"].astype(np.int64),
        tissue_mean=ex["tissue"]["mean"], tissue_std=ex["tissue"]["std"],
        tissue_fraction=float(ex["tissue"]["fraction"])))
  return sorted(cases, key=lambda c: c.case_id)


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
  """Decodes one case's ROI at a time (TFDS slicing reads only its shard)."""

  def __init__(self, data_dir: str | None):
    self._builder = _builder(data_dir)

  def __call__(self, case: CaseInfo) -> np.ndarray:
    import tensorflow_datasets as tfds
    ds = self._builder.as_dataset(split=f"{case.split}[{case.index}:{case.index + 1}]",
                                  shuffle_files=False)
    (ex,) = list(tfds.as_numpy(ds))
    if ex["file_name"].decode() != case.file_name:
      raise RuntimeError(f"{case.file_name}: dataset changed since its metadata was read")
    return ex["image"]


def iterate_rois(data_dir: str | None, cases: Sequence[CaseInfo]) -> Iterator[tuple[CaseInfo, np.ndarray]]:
  """All ROIs of the given cases, decoded in one sequential pass per split."""
  import tensorflow_datasets as tfds
  builder = _builder(data_dir)
  wanted = {(c.split, c.file_name): c for c in cases}
  for split in sorted({c.split for c in cases}):
    ds = builder.as_dataset(split=split, shuffle_files=False)
    for ex in tfds.as_numpy(ds):
      case = wanted.get((split, ex["file_name"].decode()))
      if case is not None:
        yield case, ex["image"]
