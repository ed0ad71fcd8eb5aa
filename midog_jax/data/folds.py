"""Cross-validation folds as the MIDOG++ reference code draws them.

The reference (`training.py` of the MIDOG++ repository) takes the train-split
cases of the experiment's tumour types in slide-id order, bins their
mitotic-figure counts into tertiles with `pandas.qcut(counts, 3,
labels=False)` and splits with `StratifiedKFold(5, shuffle=True,
random_state=42)`. This module does the same, so fold k here is fold k there.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from midog_jax import domains
from midog_jax.data import annotations as ann_lib

N_FOLDS = 5
N_BINS = 3
SEED = 42

Fold = tuple[list[str], list[str]]  # (train file names, valid file names)


def fold_cases(cases: Sequence[ann_lib.Case],
               tumor_types: str | Sequence[str]) -> list[ann_lib.Case]:
  """The train-split cases of `tumor_types` (any spelling), by slide id."""
  slugs = set(domains.parse_tumor_types(tumor_types))
  chosen = [c for c in cases if c.split == "train" and c.tumor in slugs]
  return sorted(chosen, key=lambda c: c.id)


def count_bins(counts: Sequence[int]) -> np.ndarray:
  """Tertile bin (0, 1, 2) of each count, as `pandas.qcut(counts, 3)`.

  The reference calls qcut with its default `duplicates='raise'`, which fails
  when tied counts make two tertile edges equal (never on the MIDOG++ files,
  whatever the tumour types). Rather than fail, such edges are merged
  (`duplicates='drop'`), which leaves fewer than three bins.
  """
  series = pd.Series(list(counts), dtype=np.int64)
  try:
    bins = pd.qcut(series, N_BINS, labels=False)
  except ValueError:
    logging.warning("Tied mitotic-figure counts give duplicate tertile "
                    "edges; merging them (pandas duplicates='drop').")
    bins = pd.qcut(series, N_BINS, labels=False, duplicates="drop")
  return np.asarray(bins, dtype=np.int64)


def folds(cases: Sequence[ann_lib.Case], tumor_types: str | Sequence[str] = "all",
          num_folds: int = N_FOLDS, seed: int = SEED) -> list[Fold]:
  """The `num_folds` (train file names, valid file names) splits of an experiment.

  Args:
    cases: all cases, e.g. from `annotations.load_cases`; test-split cases
      and other tumour types are left out here.
    tumor_types: `"all"`, comma-separated names, or a sequence of names.
    num_folds, seed: the reference's 5 and 42 by default.
  """
  if num_folds < 2:
    raise ValueError(f"num_folds must be at least 2, got {num_folds}")
  chosen = fold_cases(cases, tumor_types)
  if len(chosen) < num_folds:
    raise ValueError(
        f"{len(chosen)} train case(s) of tumour types {tumor_types!r}; "
        f"{num_folds}-fold cross-validation needs at least {num_folds} (lower num_folds)")
  bins = count_bins([len(c.mitotic_figures) for c in chosen])
  names = [c.file_name for c in chosen]
  skf = StratifiedKFold(n_splits=num_folds, shuffle=True, random_state=seed)
  try:
    splits = list(skf.split(np.zeros(len(names)), bins))
  except ValueError as e:  # Every count tertile smaller than num_folds.
    raise ValueError(f"{len(chosen)} train case(s) of tumour types {tumor_types!r} cannot be "
                     f"stratified into {num_folds} folds ({e}); lower num_folds") from None
  return [([names[i] for i in train], [names[i] for i in valid]) for train, valid in splits]


def fold(cases: Sequence[ann_lib.Case], tumor_types: str | Sequence[str], k: int,
         num_folds: int = N_FOLDS, seed: int = SEED) -> Fold:
  """Fold `k` (0 .. num_folds - 1) of `folds(cases, tumor_types, num_folds, seed)`."""
  if not 0 <= k < num_folds:
    raise ValueError(f"fold must be in 0..{num_folds - 1}, got {k}")
  return folds(cases, tumor_types, num_folds, seed)[k]
