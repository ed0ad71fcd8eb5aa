"""Z-score normalisation statistics over tissue, weighted by tissue area."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import numpy as np

from midog_jax import files


@dataclasses.dataclass(frozen=True)
class Normalization:
  """Per-channel mean and std of tissue pixels, on the 0-255 scale."""
  mean: tuple[float, float, float]
  std: tuple[float, float, float]

  @property
  def unit_mean(self) -> np.ndarray:  # 0-1 scale, as the augmentation takes it.
    return np.asarray(self.mean, np.float32) / 255.0

  @property
  def unit_std(self) -> np.ndarray:
    return np.asarray(self.std, np.float32) / 255.0

  def to_json(self) -> dict[str, list[float]]:
    return {"mean": list(self.mean), "std": list(self.std)}

  def save(self, path: str | os.PathLike[str]) -> None:
    files.write_json(path, self.to_json())

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
