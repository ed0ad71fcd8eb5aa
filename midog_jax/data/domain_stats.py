"""The paper's Table 2 per domain (printed by `python -m midog_jax.stats`).

Domains 6a and 6b share tumour type and scanner; the lab tells them apart.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from midog_jax import domains
from midog_jax.data import annotations as annotations_lib

COLUMNS = ("domain", "tumor_type", "scanner", "lab", "cases", "train_cases",
           "test_cases", "mitotic_figures", "mitotic_figures_median",
           "non_mitotic_figures", "non_mitotic_figures_median")


def domain_table(cases: Sequence[annotations_lib.Case]) -> list[dict[str, Any]]:
  """One row per domain (registry order) with the paper's Table 2 columns."""
  rows = []
  for d in domains.DOMAINS:
    mine = [c for c in cases if c.domain == d.id]
    mitotic = [len(c.mitotic_figures) for c in mine]
    non_mitotic = [len(c.non_mitotic_figures) for c in mine]
    rows.append({
        "domain": d.id,
        "tumor_type": d.tumor.slug,
        "scanner": d.scanner.name,
        "lab": d.lab,
        "cases": len(mine),
        "train_cases": sum(c.split == "train" for c in mine),
        "test_cases": sum(c.split == "test" for c in mine),
        "mitotic_figures": int(sum(mitotic)),
        "mitotic_figures_median": float(np.median(mitotic)) if mine else None,
        "non_mitotic_figures": int(sum(non_mitotic)),
        "non_mitotic_figures_median": float(np.median(non_mitotic)) if mine else None,
    })
  return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  head = ("domain", "tumour type", "scanner", "lab", "cases", "train", "test",
          "MF sum", "MF median", "non-MF sum", "non-MF median")
  body = [(r["domain"], domains.tumor_type(r["tumor_type"]).display, r["scanner"], r["lab"],
           r["cases"], r["train_cases"], r["test_cases"],
           f"{r['mitotic_figures']:,}", _num(r["mitotic_figures_median"]),
           f"{r['non_mitotic_figures']:,}", _num(r["non_mitotic_figures_median"]))
          for r in rows]
  total = ("total", "", "", "", sum(r["cases"] for r in rows),
           sum(r["train_cases"] for r in rows), sum(r["test_cases"] for r in rows),
           f"{sum(r['mitotic_figures'] for r in rows):,}", "",
           f"{sum(r['non_mitotic_figures'] for r in rows):,}", "")
  table = [head, *body, total]
  widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
  lines = ["  ".join(str(v).rjust(w) if i >= 4 else str(v).ljust(w)
                     for i, (v, w) in enumerate(zip(row, widths))) for row in table]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def _num(v: float | None) -> str:
  return "-" if v is None else f"{v:.1f}"
