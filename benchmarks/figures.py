"""Figures the README quotes, from the files the runs that measured them wrote.

    python benchmarks/figures.py record-demo [--workdir /tmp/midog_demo_record]
    python benchmarks/figures.py record-projection
    python benchmarks/figures.py update      # README.md from benchmarks/results/*.json
    python benchmarks/figures.py check       # exit 1 where README.md and the files differ

`record-demo` runs the demo from scratch in a fresh workdir (never one that
would reuse stages) and writes `benchmarks/results/demo.json`: the machine,
the command, its wall time measured outside the process, and the demo's
summary and report. In README.md a quoted figure sits between
`<!-- figure:NAME -->` and `<!-- /figure -->` (invisible when rendered);
`update` rewrites every such span from `FIGURES`, `check` (and
`tests/cli/test_readme.py`) fails when one differs, so a figure cannot go
stale silently. A new figure: a line in `FIGURES` and its marker in README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from typing import Callable

import machine as machine_lib  # benchmarks/machine.py, beside this script.

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
_SPAN = re.compile(r"<!-- figure:([\w.]+) -->(.*?)<!-- /figure -->", re.S)


def machine() -> dict:
  """What a figure was measured on."""
  import jax  # Only to name the version and the devices the figure ran on.
  return {"cpu": machine_lib.cpu_name(), "cores": machine_lib.cores(),
          "python": platform.python_version(),
          "jax": jax.__version__, "devices": str(jax.devices()[0].device_kind),
          "platform": jax.devices()[0].platform}


def record_demo(workdir: str) -> dict:
  """Runs the demo from scratch; writes and returns benchmarks/results/demo.json."""
  if os.path.exists(workdir):
    shutil.rmtree(workdir)  # A reused stage would time nothing.
  command = [sys.executable, "-m", "midog_jax.demo", "--workdir", workdir]
  start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
  subprocess.run(command, check=True, cwd=ROOT)
  seconds = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  # Other work on the machine slows a run down: what it had of the cores says so.
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
    summary = json.load(f)
  with open(os.path.join(workdir, "run", "evaluation.json"), encoding="utf-8") as f:
    evaluation = json.load(f)
  with open(os.path.join(workdir, "report", "domain_matrices.md"), encoding="utf-8") as f:
    f1_row = next(l.strip() for l in f if l.startswith("| all tumour types"))
  record = {"machine": machine(), "command": "python -m midog_jax.demo",
            "date": time.strftime("%Y-%m-%d"), "seconds": round(seconds, 1),
            "cpu_seconds": round(cpu, 1), "load_average_at_end": round(os.getloadavg()[0], 2),
            "summary": summary, "test": evaluation["test"],
            "threshold": evaluation["threshold"], "report_f1_row": f1_row}
  RESULTS.mkdir(parents=True, exist_ok=True)
  path = RESULTS / "demo.json"
  path.write_text(json.dumps(record, indent=1) + "\n")
  return record


# Rates of the same network measured on one H200 (bf16, 512 px) in the reference
# notes (a minimal JAX/Flax version: train at batch 12, forward at batch 64);
# the host's crops per core as measured here (benchmarks/README.md) on 8 cores.
H200_REFERENCE_RATES = ["--train-img-s", "1894", "--forward-img-s", "10781",
                        "--detect-windows-s", "10781", "--host-patches-s", str(8 * 2160),
                        "--compile-s", "60"]


def record_projection() -> dict:
  """Writes benchmarks/results/projection.json: `reproduce_time.py`'s arithmetic for
  one H200 (reference rates) and for this project's CPU (its measured defaults)."""
  import contextlib
  import io
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import reproduce_time  # A script beside this one, not a package module.
  record = {"what": "projected by benchmarks/reproduce_time.py, not measured", "cases": {}}
  for name, argv in (("h200", H200_REFERENCE_RATES), ("cpu", [])):
    with contextlib.redirect_stdout(io.StringIO()) as printed:
      estimate = reproduce_time.main(argv)
    record["cases"][name] = {"argv": argv, "estimate": estimate, "printed": printed.getvalue()}
  RESULTS.mkdir(parents=True, exist_ok=True)
  (RESULTS / "projection.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
  return record


def _duration(seconds: float) -> str:
  """"about 25 min", "about 31 h", "about 120 days"."""
  if seconds < 5400:
    return f"about {seconds / 60:.0f} min"
  if seconds < 3 * 86400:
    return f"about {seconds / 3600:.0f} h"
  return f"about {seconds / 86400:.0f} days"


def _load(name: str) -> dict:
  return json.loads((RESULTS / f"{name}.json").read_text())


def _machine_words(m: dict) -> str:
  return f"{m['cpu']}, {m['cores']} cores, JAX {m['jax']}"


def _score_table(d: dict) -> str:
  from midog_jax import domains
  from midog_jax.evaluation import score  # The table exactly as `eval score` prints it.
  rows = d["test"]["tumor_types"]  # In the registry's order, as the demo printed it.
  test = {**d["test"], "tumor_types": {t: rows[t] for t in domains.TUMOR_SLUGS if t in rows}}
  return score.format_table({**test, "threshold": d["threshold"]})


def _mean_std(stats: dict) -> str:
  return f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def _ensemble_comment(d: dict) -> str:
  """What the fold-ensemble measurement says, and what it cannot."""
  gain = d["ensemble"]["f1"] - d["f1"]["mean"]
  return (f"The ensemble's F1 is {gain:+.3f} against the folds' mean, on "
          f"{d['test_figures']} test figures (one figure is about "
          f"{1 / max(d['test_figures'], 1):.3f} of recall), measured {d['date']}. Synthetic "
          "data this small shows that the ensemble works end to end; it does not measure what "
          "ensembling gains on real slides.")


# name -> (record file, how the figure is written from it).
FIGURES: dict[str, tuple[str, Callable[[dict], str]]] = {
    "demo.f1": ("demo", lambda d: f"{d['summary']['f1_overall']:.3f}"),
    "demo.ap": ("demo", lambda d: f"{d['summary']['ap_overall']:.3f}"),
    "demo.threshold": ("demo", lambda d: f"{d['threshold']:.2f}"),
    "demo.test_cases": ("demo", lambda d: str(d["summary"]["test_cases"])),
    "demo.seconds": ("demo", lambda d: f"{d['seconds']:.0f} s"),
    "demo.training_seconds": ("demo", lambda d: f"{d['summary']['stage_seconds']['training']:.0f} s"),
    "demo.machine": ("demo", lambda d: _machine_words(d["machine"])),
    "demo.date": ("demo", lambda d: d["date"]),
    "demo.score_table": ("demo", lambda d: f"\n```\n{_score_table(d)}\n```\n"),
    "demo.report_f1_row": ("demo", lambda d: f"\n```\n{d['report_f1_row']}\n```\n"),
    "fold_ensemble.machine": ("fold_ensemble", lambda d: _machine_words(d["machine"])),
    "fold_ensemble.test_cases": ("fold_ensemble", lambda d: str(d["test_cases"])),
    "fold_ensemble.folds_f1": ("fold_ensemble", lambda d: _mean_std(d["f1"])),
    "fold_ensemble.folds_ap": ("fold_ensemble", lambda d: _mean_std(d["ap"])),
    "fold_ensemble.ensemble_f1": ("fold_ensemble", lambda d: f"{d['ensemble']['f1']:.3f}"),
    "fold_ensemble.ensemble_ap": ("fold_ensemble", lambda d: f"{d['ensemble']['ap']:.3f}"),
    "fold_ensemble.report_f1_row": ("fold_ensemble",
                                    lambda d: f"\n```\n{d['report_f1_row']}\n```\n"),
    "fold_ensemble.comment": ("fold_ensemble", lambda d: _ensemble_comment(d)),
    "projection.h200_run": ("projection", lambda d: _duration(d["cases"]["h200"]["estimate"]["run"])),
    "projection.h200_paper": ("projection", lambda d: _duration(
        d["cases"]["h200"]["estimate"]["training"] + d["cases"]["h200"]["estimate"]["evaluation"])),
    "projection.cpu_run": ("projection", lambda d: _duration(d["cases"]["cpu"]["estimate"]["run"])),
}


def render(name: str) -> str:
  """The text of figure `name` from its record."""
  if name not in FIGURES:
    raise KeyError(f"README.md names figure {name!r}, which benchmarks/figures.py does not "
                   f"know (known: {', '.join(FIGURES)})")
  record, write = FIGURES[name]
  return write(_load(record))


def differences(text: str) -> list[tuple[str, str, str]]:
  """(name, in the README, from the record) of every figure that differs."""
  return [(name, quoted, render(name)) for name, quoted in _SPAN.findall(text)
          if quoted != render(name)]


def update(text: str) -> str:
  return _SPAN.sub(lambda m: f"<!-- figure:{m[1]} -->{render(m[1])}<!-- /figure -->", text)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  rec = sub.add_parser("record-demo", help="run the demo from scratch and record its figures")
  rec.add_argument("--workdir", default="/tmp/midog_demo_record",
                   help="fresh workdir for the demo (deleted first)")
  sub.add_parser("record-projection", help="record reproduce_time.py's projections")
  sub.add_parser("update", help="rewrite README.md's figures from their records")
  sub.add_parser("check", help="exit 1 where README.md and the records differ")
  args = parser.parse_args(argv)
  if args.command == "record-demo":
    record = record_demo(args.workdir)
    print(f"demo: {record['seconds']:.0f} s, F1 {record['summary']['f1_overall']:.3f}, "
          f"AP {record['summary']['ap_overall']:.3f} on {_machine_words(record['machine'])}")
    return 0
  if args.command == "record-projection":
    for name, case in record_projection()["cases"].items():
      print(f"{name}: one run {_duration(case['estimate']['run'])}")
    return 0
  text = README.read_text()
  if args.command == "update":
    README.write_text(update(text))
    return 0
  for name, quoted, recorded in differences(text):
    print(f"README.md figure {name}: {quoted!r}, recorded {recorded!r}")
  return 1 if differences(text) else 0


if __name__ == "__main__":
  sys.exit(main())
