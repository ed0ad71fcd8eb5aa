"""Matrices of the domain experiments: trained on some domains, tested on each.

  results = [RunResult("domains_1a+1b", 0, per_tumor, per_domain={"1c": {"f1": ..}},
                       variant="macenko"), ...]
  paths = write_domain_report(results, "REPORT")

A domain experiment is a run `domains_<ids>` (e.g. `domains_1a+1b`, the
MIDOG 2021 setting with scanner 1c left out; configs/leave_one_domain_out.py).
Its matrix rows are (training domains, stain variant), columns test domains.
The held-out table keeps, for each training set, the domains of its tumour
types it was not trained on, with one column per variant: the stain
switches side by side. Cells are means and stds over folds, marked as in
`domain_matrix` when folds are missing, with the fold ensemble's value
where one is given.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Mapping, Sequence

from midog_jax import atomic
from midog_jax import domains
from midog_jax.evaluation import domain_matrix as dm

DOMAIN_PREFIX = domains.DOMAIN_EXPERIMENT_PREFIX
DOMAIN_CSV_FIELDS = ("table", "metric", "variant", "train", "test", "mean", "std", "n_folds",
                     "folds", "complete", "ensemble", "ensemble_folds")


def is_domain_experiment(name: str) -> bool:
  return name.startswith(DOMAIN_PREFIX)


def held_out(train: str) -> tuple[str, ...]:
  """Domains of the tumour types of training set `train` ("1a+1b") not in it."""
  ids = domains.parse_domain_set(train)
  tumours = {domains.domain(i).tumor for i in ids}
  return tuple(d.id for d in domains.DOMAINS if d.tumor in tumours and d.id not in ids)


def _variant_key(v: str) -> tuple[bool, str]:
  return (v != "none", v)  # The paper's ("none") first.


Grid = dict[tuple[str, str], dict[str, dm.Cell]]  # {(row key, row key): {column: Cell}}


def _row_of(experiment: str, variant: str) -> tuple[str, str]:
  ids = domains.parse_domain_set(experiment[len(DOMAIN_PREFIX):])
  return domains.domain_set_name(ids), variant


def domain_matrices(results: Iterable[dm.RunResult], folds: Sequence[int] = dm.DEFAULT_FOLDS,
                    ddof: int = dm.DEFAULT_DDOF, ensembles: Iterable[dm.EnsembleResult] = ()
                    ) -> dict[str, Grid]:
  """{metric: {(training set, variant): {test domain: Cell}}} of the domain experiments.

  Rows in registry order of their training set, then variant ("none" first);
  every domain is a column (empty where the test split has none of it).
  """
  folds = tuple(sorted(int(k) for k in folds))
  by_row: dict[tuple[str, str], dict[int, Mapping]] = {}
  for r in results:
    if not is_domain_experiment(r.experiment):
      continue
    row = _row_of(r.experiment, r.variant)
    per_fold = by_row.setdefault(row, {})
    if int(r.fold) in per_fold:
      raise ValueError(f"two results for {r.experiment} ({r.variant}) fold {r.fold}")
    if int(r.fold) in folds:
      per_fold[int(r.fold)] = r.per_domain or {}
  by_ensemble = dm.ensemble_values(
      [e for e in ensembles if is_domain_experiment(e.experiment)],
      lambda e: _row_of(e.experiment, e.variant), lambda e: e.per_domain)
  order = lambda row: ([domains.DOMAIN_IDS.index(i) for i in row[0].split("+")],
                       _variant_key(row[1]))
  out = {}
  for metric in dm.METRICS:
    out[metric] = {}
    for row in sorted(by_row, key=order):
      per_fold = by_row[row]
      out[metric][row] = {}
      ens_folds, ens = by_ensemble.get(row, ((), {}))
      for test in domains.DOMAIN_IDS:
        present = [(k, dm.value_of(per_fold[k].get(test), metric)) for k in sorted(per_fold)]
        present = [(k, v) for k, v in present if v is not None]
        out[metric][row][test] = dm.Cell("domains", metric, row[0], test,
                                         tuple(k for k, _ in present),
                                         tuple(v for _, v in present), folds, ddof,
                                         dm.value_of(ens.get(test), metric), ens_folds)
  return out


def switch_table(mats: Mapping) -> dict[str, Grid]:
  """{metric: {(training set, held-out domain): {variant: Cell}}} from `domain_matrices`."""
  out = {}
  for metric, grid in mats.items():
    out[metric] = {}
    for (train, variant), row in grid.items():
      for test in held_out(train):
        out[metric].setdefault((train, test), {})[variant] = row[test]
  return out


def _domain_rows(grid: Mapping, columns: Sequence[str]) -> list[str]:
  lines = []
  for key, row in grid.items():
    texts = [dm.format_cell(row[c].mean, row[c].std)
             + (f" {dm.INCOMPLETE}" if row[c].marked else "") + dm.format_ensemble(row[c])
             if c in row else "" for c in columns]
    lines.append(f"| {' | '.join(key)} | " + " | ".join(texts) + " |")
  return lines


def domain_markdown(mats: Mapping) -> str:
  """The domain matrices and the held-out comparison of the switches as Markdown."""
  parts = []
  table = switch_table(mats)
  variants = sorted({v for grid in mats.values() for _, v in grid}, key=_variant_key)
  for metric in dm.METRICS:
    name = dm.METRIC_NAMES[metric]
    any_cell = next(iter(next(iter(mats[metric].values())).values()))
    folds = f"mean ± std (ddof={any_cell.ddof}) over folds {dm.fold_list(any_cell.requested)}"
    parts.append(f"## Held-out domains: {name} per stain switch\n\n{folds}; rows: training "
                 "domains and the domain of their tumour type left out, columns: the "
                 "switches (none: the paper's).\n")
    lines = ["| training domains | held-out domain | " + " | ".join(variants) + " |",
             "|---" * (len(variants) + 2) + "|"]
    parts.append("\n".join(lines + _domain_rows(table[metric], variants)) + "\n")
  for metric in dm.METRICS:
    parts.append(f"## Domain matrix: {dm.METRIC_NAMES[metric]}\n\nRows: training domains and "
                 "stain switch, columns: test domains (– none in the test split, or no "
                 "fold).\n")
    cols = list(domains.DOMAIN_IDS)
    lines = ["| training domains | switch | " + " | ".join(cols) + " |",
             "|---" * (len(cols) + 2) + "|"]
    parts.append("\n".join(lines + _domain_rows(mats[metric], cols)) + "\n")
  marked = any(c.marked for grid in mats.values() for row in grid.values() for c in row.values())
  if marked:
    parts.append(f"{dm.INCOMPLETE} fewer folds than requested have a value (see the CSV).\n")
  parts.append(dm.ensemble_note(c for grid in mats.values() for row in grid.values()
                                for c in row.values()))
  return "\n".join(parts)


def write_domain_report(results: Iterable[dm.RunResult], out_dir: str,
                        folds: Sequence[int] = dm.DEFAULT_FOLDS,
                        ddof: int = dm.DEFAULT_DDOF,
                        ensembles: Iterable[dm.EnsembleResult] = ()) -> list[str]:
  """domain_experiments.csv (one row per cell of both tables) and .md; the paths."""
  os.makedirs(out_dir, exist_ok=True)
  mats = domain_matrices(results, folds, ddof, ensembles)
  out = io.StringIO(newline="")
  w = csv.writer(out)
  w.writerow(DOMAIN_CSV_FIELDS)
  for table, grids in (("domains", mats), ("held_out", switch_table(mats))):
    for metric, grid in grids.items():
      for key, row in grid.items():
        for col, c in row.items():
          variant, test = (key[1], col) if table == "domains" else (col, key[1])
          w.writerow([table, metric, variant, key[0], test, dm.csv_number(c.mean),
                      dm.csv_number(c.std), c.n_folds, ";".join(map(str, c.folds)),
                      int(not c.marked), dm.csv_number(c.ensemble),
                      ";".join(map(str, c.ensemble_folds))])
  csv_path = os.path.join(out_dir, "domain_experiments.csv")
  md_path = os.path.join(out_dir, "domain_experiments.md")
  atomic.write_text(csv_path, out.getvalue())
  atomic.write_text(md_path, "# Domain experiments\n\n" + domain_markdown(mats))
  return [csv_path, md_path]
