"""Z-score normalisation over tissue: a tissue mask, per-image statistics, their pooling.

`tissue_stats` runs once per ROI when the dataset is built (the statistics
are stored with each record); `tissue_weighted` pools a run's training cases
into its `Normalization`. A run with a stain switch also carries its
`stain.RunStain` there, so everything that normalises sees both.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np

from midog_jax import atomic

# Background (glass) is bright and grey; tissue is coloured or darker.
MIN_CHROMA = 18
MAX_GREY = 200


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
  """True where an RGB uint8 image shows tissue rather than empty glass."""
  rgb = rgb.astype(np.int16)
  chroma = rgb.max(axis=-1) - rgb.min(axis=-1)
  return (chroma >= MIN_CHROMA) | (rgb.mean(axis=-1) < MAX_GREY)


def tissue_stats(rgb: np.ndarray, stride: int = 4) -> dict[str, np.ndarray | float]:
  """Per-channel mean and std (0-255 scale) over tissue pixels, and the
  tissue fraction; sampled on a `stride` grid, which changes them by far
  less than the differences between cases."""
  sample = rgb[::stride, ::stride].reshape(-1, 3)
  mask = tissue_mask(sample)
  fraction = float(mask.mean()) if mask.size else 0.0
  pixels = sample[mask].astype(np.float64) if mask.any() else sample.astype(np.float64)
  return {"mean": pixels.mean(axis=0).astype(np.float32),
          "std": pixels.std(axis=0).astype(np.float32),
          "fraction": fraction}


@dataclasses.dataclass(frozen=True)
class Normalization:
  """Per-channel mean and std of tissue pixels, on the 0-255 scale."""
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  # The run's `stain.RunStain` (stain.json), or None: no stain switch. Not in
  # normalization.json, so runs without one keep their files.
  stain: Any = None

  @property
  def unit_mean(self) -> np.ndarray:  # 0-1 scale, as the augmentation takes it.
    return np.asarray(self.mean, np.float32) / 255.0

  @property
  def unit_std(self) -> np.ndarray:
    return np.asarray(self.std, np.float32) / 255.0

  def to_json(self) -> dict[str, list[float]]:
    return {"mean": list(self.mean), "std": list(self.std)}

  def save(self, path: str | os.PathLike[str]) -> None:
    atomic.write_json(path, self.to_json())

  @classmethod
  def load(cls, path: str | os.PathLike[str]) -> "Normalization":
    with open(path, encoding="utf-8") as f:
      d = json.load(f)
    return cls(tuple(map(float, d["mean"])), tuple(map(float, d["std"])))


def tissue_weighted(means: Sequence[Sequence[float]], stds: Sequence[Sequence[float]],
                    tissue_pixels: Sequence[float]) -> Normalization:
  """Pools per-image tissue statistics as if over all tissue pixels at once.

  With weights w_i (tissue pixels of image i): mean = sum w_i m_i / sum w_i,
  var = sum w_i (s_i^2 + m_i^2) / sum w_i - mean^2.
  """
  m = np.asarray(means, np.float64)
  s = np.asarray(stds, np.float64)
  w = np.asarray(tissue_pixels, np.float64)
  if m.ndim != 2 or m.shape[1] != 3 or m.shape != s.shape or w.shape != m.shape[:1]:
    raise ValueError(f"expected [K, 3] means and stds and [K] weights, got "
                     f"{m.shape}, {s.shape}, {w.shape}")
  if not (w > 0).any():
    raise ValueError("no tissue in any training image: cannot normalise")
  w = w / w.sum()
  mean = (w[:, None] * m).sum(0)
  var = (w[:, None] * (s ** 2 + m ** 2)).sum(0) - mean ** 2
  std = np.sqrt(np.maximum(var, 1e-6))
  return Normalization(tuple(float(v) for v in mean), tuple(float(v) for v in std))
