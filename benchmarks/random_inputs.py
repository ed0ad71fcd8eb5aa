"""Random cases for the benchmarks that time the training path without a dataset."""

from __future__ import annotations

import numpy as np

from midog_jax.data import annotations
from midog_jax.data import sampling


def random_cases(n: int, side: int, objects: int = 50, seed: int = 0):
  """(cases, {case id: uint8 ROI}): random `side` x `side` ROIs, `objects` positions
  each (MIDOG++ averages 52), every other one a mitotic figure."""
  rng = np.random.default_rng(seed)
  cases, rois = [], {}
  for i in range(n):
    xy = rng.uniform(30, side - 30, (objects, 2)).astype(np.float32)
    labels = np.where(np.arange(objects) % 2 == 0, annotations.MITOTIC_FIGURE,
                      annotations.NON_MITOTIC_FIGURE).astype(np.int32)
    cases.append(sampling.SampledCase(i, side, side, xy, labels))
    rois[i] = rng.integers(0, 256, (side, side, 3), np.uint8)
  return cases, rois
