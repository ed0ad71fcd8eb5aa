"""The MIDOG++ paper's published domain matrices (Tables 4-7) as data.

  from midog_jax.evaluation import paper
  paper.cell("single_domain", "f1", "canine_mast_cell_tumor",
             "canine_mast_cell_tumor")  # {"mean": 0.85, "std": 0.0}

Rows are training sets: a tumour slug (for "leave_one_out" the type left
out) or `ALL_DOMAINS` for the single-domain table's all-types row. Columns
are test tumour slugs. Names are looked up through `domains.tumor_type`, so
any spelling the registry knows works.
"""

from __future__ import annotations

import copy
import functools
import json
import os

from midog_jax import domains

MATRICES = ("single_domain", "leave_one_out")
METRICS = ("f1", "ap")
ALL_DOMAINS = "all_domains"
_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                     "paper_results.json")


@functools.lru_cache(maxsize=1)
def _load() -> dict:
  with open(_PATH, encoding="utf-8") as f:
    return json.load(f)


def load() -> dict:
  """The whole file: {"source", "note", "tables": {"<matrix>_<metric>": ...}}."""
  return copy.deepcopy(_load())  # Callers may mutate; keep the cache clean.


def _check(matrix: str, metric: str) -> None:
  if matrix not in MATRICES:
    raise KeyError(f"unknown matrix {matrix!r}; known: {', '.join(MATRICES)}")
  if metric not in METRICS:
    raise KeyError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")


def row_key(name: str) -> str:
  """A training-set name as used in the tables: a slug or `ALL_DOMAINS`."""
  if name.strip().lower().replace(" ", "_") in (ALL_DOMAINS, "all"):
    return ALL_DOMAINS
  return domains.tumor_type(name).slug


def table_number(matrix: str, metric: str) -> int:
  """The paper's table number, e.g. 4 for single-domain F1."""
  _check(matrix, metric)
  return _load()["tables"][f"{matrix}_{metric}"]["table"]


def table(matrix: str, metric: str) -> dict[str, dict[str, dict[str, float]]]:
  """{train: {test_slug: {"mean": m, "std": s}}} of one table."""
  _check(matrix, metric)
  return copy.deepcopy(_load()["tables"][f"{matrix}_{metric}"]["rows"])


def rows(matrix: str) -> tuple[str, ...]:
  """Training-set keys of a matrix in registry order (all-types row last)."""
  _check(matrix, "f1")
  extra = (ALL_DOMAINS,) if matrix == "single_domain" else ()
  return domains.TUMOR_SLUGS + extra


def cell(matrix: str, metric: str, train: str, test: str) -> dict[str, float] | None:
  """{"mean", "std"} of one cell, or None where the paper has no such cell."""
  _check(matrix, metric)
  rows_ = _load()["tables"][f"{matrix}_{metric}"]["rows"]
  value = rows_.get(row_key(train), {}).get(domains.tumor_type(test).slug)
  return dict(value) if value is not None else None
