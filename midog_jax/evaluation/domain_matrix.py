"""The paper's domain matrices (Tables 4-7, Figures 3-4) from scored runs.

  results = [RunResult("single_canine_lymphoma", 0, {slug: {"f1": .., "ap": ..,
                                                            "tp": .., ...}}), ...]
  paths = write_report(results, "REPORT", compare_paper=True)

Rows are training sets (run `single_<slug>`, `without_<slug>` or
`all_domains`), columns test tumour types. A cell is the mean and standard
deviation over folds; a cell missing some of the requested folds says which
folds it has and is marked, one with none is empty. Given the experiments'
fold ensembles (`EnsembleResult`, from `ensembles.py`), a cell also shows
the ensemble's value ("ens."), marked when it has fewer members than folds
were requested.

Domain experiments (runs `domains_<ids>`) have their matrices in
`domain_experiments`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import textwrap
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from midog_jax import atomic
from midog_jax import domains
from midog_jax.evaluation import paper

MATRICES = paper.MATRICES
METRICS = paper.METRICS
ALL_DOMAINS = paper.ALL_DOMAINS
DEFAULT_FOLDS = (0, 1, 2, 3, 4)
# Population std (numpy's default). The paper does not say which it used
# and its two-decimal values cannot tell the two apart.
DEFAULT_DDOF = 0
INCOMPLETE = "†"
CSV_FIELDS = ("matrix", "metric", "train", "test", "mean", "std", "n_folds",
              "folds", "complete", "ensemble", "ensemble_folds", "paper_mean", "paper_std")
_TITLES = {"single_domain": "Single-domain training",
           "leave_one_out": "Leave-one-out training"}
METRIC_NAMES = {"f1": "F1", "ap": "AP"}


@dataclasses.dataclass(frozen=True)
class RunResult:
  """Test-split scores of one trained run (experiment × fold)."""
  experiment: str  # "single_<slug>", "without_<slug>", "all_domains" or "domains_<ids>".
  fold: int
  # {test_slug: {"f1", "ap", "tp", "fp", "fn"}}
  per_tumor: Mapping[str, Mapping[str, float]]
  # {test domain id: the same}, and the run's stain switches ("none": the paper's).
  per_domain: Mapping[str, Mapping[str, float]] | None = None
  variant: str = "none"


@dataclasses.dataclass(frozen=True)
class EnsembleResult:
  """Test-split scores of an experiment's fold ensemble (the folds' models combined)."""
  experiment: str
  folds: tuple[int, ...]  # Its members' folds.
  per_tumor: Mapping[str, Mapping[str, float]]
  per_domain: Mapping[str, Mapping[str, float]] | None = None
  variant: str = "none"


@dataclasses.dataclass(frozen=True)
class Cell:
  """One matrix entry: a metric over the folds that have it."""
  matrix: str
  metric: str
  train: str  # Tumour slug or ALL_DOMAINS.
  test: str
  folds: tuple[int, ...]  # Folds present, ascending.
  values: tuple[float, ...]  # One per fold in `folds`.
  requested: tuple[int, ...]
  ddof: int = DEFAULT_DDOF
  ensemble: float | None = None  # The fold ensemble's value, where there is one.
  ensemble_folds: tuple[int, ...] = ()  # Its members' folds.

  @property
  def n_folds(self) -> int:
    return len(self.folds)

  @property
  def complete(self) -> bool:
    return set(self.requested) <= set(self.folds)

  @property
  def empty(self) -> bool:
    return not self.folds

  @property
  def marked(self) -> bool:
    """Shown with INCOMPLETE: a value over fewer folds than requested."""
    return not self.empty and not self.complete

  @property
  def ensemble_marked(self) -> bool:
    """The ensemble's value is of fewer members than folds were requested."""
    return self.ensemble is not None and not set(self.requested) <= set(self.ensemble_folds)

  @property
  def mean(self) -> float | None:
    return float(np.mean(self.values)) if self.values else None

  @property
  def std(self) -> float | None:
    if len(self.values) <= self.ddof:
      return None
    return float(np.std(self.values, ddof=self.ddof))

  def paper(self) -> dict[str, float] | None:
    return paper.cell(self.matrix, self.metric, self.train, self.test)


def parse_experiment(name: str) -> tuple[str, str]:
  """Run name -> (matrix, training-set row key)."""
  if name == ALL_DOMAINS:
    return "single_domain", ALL_DOMAINS
  for prefix, matrix in (("single_", "single_domain"),
                         ("without_", "leave_one_out")):
    if name.startswith(prefix):
      return matrix, domains.tumor_type(name[len(prefix):]).slug
  raise ValueError(f"unknown experiment {name!r}; expected single_<tumour>, "
                   f"without_<tumour> or {ALL_DOMAINS}")


def value_of(scores: Mapping[str, float] | None, metric: str) -> float | None:
  if scores is None or scores.get(metric) is None:
    return None
  v = float(scores[metric])
  return None if math.isnan(v) else v  # Undefined metric: no value this fold.


def ensemble_values(ensembles: Iterable[EnsembleResult], key, per) -> dict:
  """{key(experiment): (folds, per(result))} of the ensembles; one per key."""
  out = {}
  for e in ensembles:
    k = key(e)
    if k in out:
      raise ValueError(f"two ensembles of {e.experiment} ({e.variant})")
    out[k] = (tuple(sorted(int(f) for f in e.folds)), per(e) or {})
  return out


def matrices(results: Iterable[RunResult], folds: Sequence[int] = DEFAULT_FOLDS,
             ddof: int = DEFAULT_DDOF, ensembles: Iterable[EnsembleResult] = ()
             ) -> dict[str, dict[str, dict[str, dict[str, Cell]]]]:
  """{matrix: {metric: {train: {test: Cell}}}} over the requested folds.

  Every row and column is present (registry order, the all-types row last in
  "single_domain"); results for folds outside `folds` are left out.
  """
  by_ensemble = ensemble_values(
      ensembles, lambda e: parse_experiment(e.experiment),
      lambda e: {domains.tumor_type(t).slug: s for t, s in e.per_tumor.items()})
  folds = tuple(sorted(int(k) for k in folds))
  by_run: dict[tuple[str, str], dict[int, Mapping]] = {}
  seen = set()
  for r in results:
    key = parse_experiment(r.experiment)
    if (key, int(r.fold)) in seen:
      raise ValueError(f"two results for {r.experiment} fold {r.fold}")
    seen.add((key, int(r.fold)))
    per_fold = by_run.setdefault(key, {})
    if int(r.fold) in folds:
      per_fold[int(r.fold)] = {domains.tumor_type(t).slug: s
                               for t, s in r.per_tumor.items()}
  out = {}
  for matrix in MATRICES:
    out[matrix] = {}
    for metric in METRICS:
      grid = {}
      for train in paper.rows(matrix):
        per_fold = by_run.get((matrix, train), {})
        grid[train] = {}
        ens_folds, ens = by_ensemble.get((matrix, train), ((), {}))
        for test in domains.TUMOR_SLUGS:
          present = [(k, value_of(per_fold[k].get(test), metric)) for k in sorted(per_fold)]
          present = [(k, v) for k, v in present if v is not None]
          grid[train][test] = Cell(matrix, metric, train, test,
                                   tuple(k for k, _ in present),
                                   tuple(v for _, v in present), folds, ddof,
                                   value_of(ens.get(test), metric), ens_folds)
      out[matrix][metric] = grid
  return out


def cells(mats: Mapping) -> list[Cell]:
  """All cells of `matrices(...)` in report order."""
  return [c for matrix in MATRICES for metric in METRICS
          for row in mats[matrix][metric].values() for c in row.values()]


def row_label(matrix: str, train: str) -> str:
  if train == ALL_DOMAINS:
    return "all tumour types"
  name = domains.tumor_type(train).display
  return f"w/o {name}" if matrix == "leave_one_out" else name


def csv_number(v: float | None) -> str:
  return "" if v is None else repr(float(v))


def write_csv(mats: Mapping, path: str, compare_paper: bool = False) -> str:
  """One row per cell; `folds` is the ';'-joined folds present, `complete`
  is 0 where the Markdown and the heatmaps mark the cell with INCOMPLETE."""
  out = io.StringIO(newline="")
  w = csv.writer(out)
  w.writerow(CSV_FIELDS)
  for c in cells(mats):
    p = c.paper() if compare_paper else None
    w.writerow([c.matrix, c.metric, c.train, c.test, csv_number(c.mean), csv_number(c.std),
                c.n_folds, ";".join(map(str, c.folds)), int(not c.marked),
                csv_number(c.ensemble), ";".join(map(str, c.ensemble_folds)),
                csv_number(p and p["mean"]), csv_number(p and p["std"])])
  atomic.write_text(path, out.getvalue())
  return path


def format_cell(mean: float | None, std: float | None) -> str:
  if mean is None:
    return "–"
  return f"{mean:.2f}" + ("" if std is None else f" ± {std:.2f}")


def fold_list(folds: Sequence[int]) -> str:
  return ", ".join(map(str, folds)) if folds else "none"


def format_ensemble(c: Cell) -> str:
  """" · ens. 0.74" (marked when of fewer members than requested folds), or ""."""
  if c.ensemble is None:
    return ""
  return f" · ens. {c.ensemble:.2f}" + (f" {INCOMPLETE}" if c.ensemble_marked else "")


def ensemble_note(cells_: Iterable[Cell]) -> str:
  """The Markdown legend of "ens.", when some cell has an ensemble."""
  with_ensemble = [c for c in cells_ if c.ensemble is not None]
  if not with_ensemble:
    return ""
  note = ("ens.: the fold ensemble on the test split (the folds' models combined as "
          "`detect --model ... --model ...` does: detections fused, at the mean of the "
          "folds' thresholds)")
  partial = sorted({c.ensemble_folds for c in with_ensemble if c.ensemble_marked})
  if partial:
    note += f"; {INCOMPLETE} after ens.: of folds " + "; ".join(map(fold_list, partial)) + " only"
  return note + ".\n"


def markdown(mats: Mapping, compare_paper: bool = False) -> str:
  """All four matrices as Markdown tables with footnotes."""
  parts = []
  for matrix in MATRICES:
    for metric in METRICS:
      grid = mats[matrix][metric]
      any_cell = next(iter(next(iter(grid.values())).values()))
      requested, ddof = any_cell.requested, any_cell.ddof
      parts.append(f"## {_TITLES[matrix]}: {METRIC_NAMES[metric]} "
                   f"(paper Table {paper.table_number(matrix, metric)})\n")
      parts.append(f"Mean ± std (ddof={ddof}) over folds {fold_list(requested)}; "
                   "rows: training set, columns: test tumour type.\n")
      cols = [domains.tumor_type(t).display for t in domains.TUMOR_SLUGS]
      lines = ["| training set | " + " | ".join(cols) + " |",
               "|---" * (len(cols) + 1) + "|"]
      notes = []
      for train, row in grid.items():
        texts = []
        for c in row.values():
          t = format_cell(c.mean, c.std)
          if c.marked:
            t += f" {INCOMPLETE}"
          t += format_ensemble(c)
          if compare_paper and (p := c.paper()) is not None:
            t += f" (paper {format_cell(p['mean'], p['std'])})"
          texts.append(t)
        lines.append(f"| {row_label(matrix, train)} | " + " | ".join(texts) + " |")
        notes += _row_notes(matrix, train, row)
      parts.append("\n".join(lines) + "\n")
      if notes:
        parts.append(f"{INCOMPLETE} Fewer folds than requested have a value (a run "
                     "missing, or the metric undefined: no figures in the split); the "
                     "value is over these folds:\n\n" + "\n".join(notes) + "\n")
      parts.append("– no fold has this cell.\n" if any(
          c.empty for row in grid.values() for c in row.values()) else "")
      parts.append(ensemble_note(c for row in grid.values() for c in row.values()))
  return "\n".join(p for p in parts if p)


def _row_notes(matrix: str, train: str, row: Mapping[str, Cell]) -> list[str]:
  """One line per distinct fold set among the row's incomplete cells."""
  groups: dict[tuple[int, ...], list[str]] = {}
  for test, c in row.items():
    if c.marked:
      groups.setdefault(c.folds, []).append(test)
  notes = []
  for folds, tests in groups.items():
    where = ("all columns" if len(tests) == len(row) else
             "columns " + ", ".join(domains.tumor_type(t).display for t in tests))
    notes.append(f"- {row_label(matrix, train)}: folds {fold_list(folds)} "
                 f"({where})")
  return notes


def write_markdown(mats: Mapping, path: str, compare_paper: bool = False) -> str:
  atomic.write_text(path, "# Domain matrices\n\n" + markdown(mats, compare_paper))
  return path


def plot_matrix(mats: Mapping, matrix: str, metric: str, path: str,
                compare_paper: bool = False) -> str:
  """A heatmap like the paper's Figures 3 and 4, written as PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  grid = mats[matrix][metric]
  trains, tests = list(grid), list(domains.TUMOR_SLUGS)
  means = np.array([[np.nan if grid[r][t].mean is None else grid[r][t].mean
                     for t in tests] for r in trains])
  # Empty cells grey, not a colour of the scale.
  cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9")
  fig, ax = plt.subplots(figsize=(11, 1.15 * len(trains) + 2.2))
  im = ax.imshow(np.ma.masked_invalid(means), cmap=cmap, vmin=0.0, vmax=1.0,
                 aspect="auto")
  incomplete = False
  with_ensemble = any(c.ensemble is not None for row in grid.values() for c in row.values())
  # Room under the mean and std for the ensemble's and the paper's values, when shown.
  n_extra = int(with_ensemble) + int(compare_paper)
  y_mean, y_std = {0: (-0.1, 0.2), 1: (-0.22, 0.06), 2: (-0.28, -0.03)}[n_extra]
  y_ensemble, y_paper = (0.19, 0.36) if n_extra == 2 else (0.32, 0.32)
  for i, r in enumerate(trains):
    for j, t in enumerate(tests):
      c = grid[r][t]
      dark = c.mean is not None and c.mean < 0.55
      color = "white" if dark else "black"
      if c.mean is None:
        ax.text(j, i + y_mean, "–", ha="center", va="center", fontsize=12)
      else:
        mark = f" {INCOMPLETE}" if c.marked else ""
        incomplete |= bool(mark)
        ax.text(j, i + y_mean, f"{c.mean:.2f}{mark}", ha="center", va="center",
                fontsize=12, fontweight="bold", color=color)
        if c.std is not None:
          ax.text(j, i + y_std, f"± {c.std:.2f}", ha="center", va="center",
                  fontsize=8.5, color=color)
      if c.ensemble is not None:
        mark = f" {INCOMPLETE}" if c.ensemble_marked else ""
        incomplete |= bool(mark)
        ax.text(j, i + y_ensemble, f"ens. {c.ensemble:.2f}{mark}", ha="center", va="center",
                fontsize=8.5, color=color)
      if compare_paper and (p := c.paper()) is not None:
        ax.text(j, i + y_paper, f"paper {p['mean']:.2f} ± {p['std']:.2f}",
                ha="center", va="center", fontsize=7, color=color,
                fontstyle="italic")
  wrap = lambda s: textwrap.fill(s, 14)
  ax.set_xticks(range(len(tests)), [wrap(domains.tumor_type(t).display) for t in tests],
                fontsize=9)
  ax.set_yticks(range(len(trains)), [wrap(row_label(matrix, r)) for r in trains],
                fontsize=9)
  ax.xaxis.tick_top()
  ax.set_xlabel("test tumour type", fontsize=10, labelpad=10)
  ax.xaxis.set_label_position("top")
  ax.set_ylabel("training set" if matrix == "single_domain" else "left out",
                fontsize=10)
  ax.set_xticks(np.arange(-0.5, len(tests)), minor=True)
  ax.set_yticks(np.arange(-0.5, len(trains)), minor=True)
  ax.grid(which="minor", color="white", linewidth=1.5)
  ax.tick_params(which="minor", length=0)
  fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02,
               label=f"mean {METRIC_NAMES[metric]}")
  requested = next(iter(grid[trains[0]].values())).requested
  ax.set_title(f"{_TITLES[matrix]}: mean {METRIC_NAMES[metric]} over folds "
               f"{fold_list(requested)}" + (" (ens.: their ensemble)" if with_ensemble else ""),
               fontsize=12, pad=12)
  if incomplete:
    fig.text(0.01, 0.01, f"{INCOMPLETE} fewer folds than requested; "
             "the value is over the folds present (see the CSV).", fontsize=8)
  fig.tight_layout(rect=(0, 0.03 if incomplete else 0, 1, 1))
  atomic.write_figure(path, fig, dpi=110)
  plt.close(fig)
  return path


def write_report(results: Iterable[RunResult], out_dir: str,
                 compare_paper: bool = False, folds: Sequence[int] = DEFAULT_FOLDS,
                 ddof: int = DEFAULT_DDOF, ensembles: Iterable[EnsembleResult] = ()
                 ) -> list[str]:
  """CSV, Markdown and one PNG per matrix and metric; returns the paths."""
  os.makedirs(out_dir, exist_ok=True)
  mats = matrices(results, folds, ddof, ensembles)
  paths = [write_csv(mats, os.path.join(out_dir, "domain_matrices.csv"), compare_paper),
           write_markdown(mats, os.path.join(out_dir, "domain_matrices.md"), compare_paper)]
  for matrix in MATRICES:
    for metric in METRICS:
      paths.append(plot_matrix(mats, matrix, metric,
                               os.path.join(out_dir, f"{matrix}_{metric}.png"),
                               compare_paper))
  return paths

