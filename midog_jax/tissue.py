"""Per-image tissue statistics for z-score normalisation."""

from __future__ import annotations

import numpy as np

# Background (glass) is bright and grey; tissue is coloured or darker.
_MIN_CHROMA = 18
_MAX_GREY = 200


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
  """True where an RGB uint8 image shows tissue rather than empty glass."""
  rgb = rgb.astype(np.int16)
  chroma = rgb.max(axis=-1) - rgb.min(axis=-1)
  return (chroma >= _MIN_CHROMA) | (rgb.mean(axis=-1) < _MAX_GREY)


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
