"""The whole system on a synthetic MIDOG++: the demo's five stages.

`run` writes a synthetic MIDOG++ in the real formats, builds it with the
real TFDS builder, trains, detects and scores on the test split (threshold
chosen on the validation fold), draws overlays and writes
`WORKDIR/summary.json`. A stage already done is reused, and keeps the time
it took when it ran. The command line is `python -m midog_jax.demo`.
"""

from __future__ import annotations

import logging
import os
import time

from midog_jax import atomic
from midog_jax import console


class Stages:
  """Stage headers and times: each stage's seconds when it ran, kept from an
  earlier demo for stages reused from it (so `wall_seconds` stays the time
  of computing them, not of finding them done)."""

  def __init__(self, previous: dict[str, float]):
    self.seconds = dict(previous)
    self._name, self._start = None, 0.0

  def start(self, number: int, key: str, title: str) -> None:
    self._end()
    logging.info("\n== %d/5 %s", number, title)
    self._name, self._start = key, time.time()

  def reused(self, what: str) -> None:
    logging.info("reusing %s", what)
    self._name = None  # Keeps the earlier demo's time of this stage.

  def _end(self) -> None:
    if self._name is not None:
      self.seconds[self._name] = round(time.time() - self._start, 1)
      logging.info("(%s: %s)", self._name, console.format_duration(self.seconds[self._name]))
    self._name = None

  def close(self) -> dict[str, float]:
    self._end()
    return self.seconds


def synthetic_data(config, workdir: str, stages: Stages | None = None) -> tuple[str, str]:
  """(manual dir, TFDS data dir) of the synthetic MIDOG++ of `config.synthetic` under
  WORKDIR/data: written and built, or found done (stages 1 and 2)."""
  import tensorflow_datasets as tfds

  from midog_jax.data import synthetic
  from tfds_midogpp.midogpp import midogpp_dataset_builder as builder_lib

  stages = stages or Stages({})
  tty = console.stderr_is_tty()
  if not tty:  # Bars are for terminals; a log file gets the trainer's lines.
    tfds.disable_progress_bar()
  manual, data_dir = os.path.join(workdir, "data", "manual"), os.path.join(workdir, "data", "tfds")
  stages.start(1, "synthetic", "synthetic MIDOG++ (TIFFs, MIDOG++.json, datasets_xvalidation.csv)")
  s = config.synthetic
  if os.path.exists(os.path.join(manual, "datasets_xvalidation.csv")):
    stages.reused(manual)
  else:
    synthetic.write_dataset(manual, s.cases_per_domain, s.width, s.height, seed=s.seed,
                            density_scale=s.density_scale, progress=tty)

  stages.start(2, "build", "TFDS build (tfds build midogpp --imports tfds_midogpp --manual_dir ...)")
  builder = builder_lib.Builder(data_dir=data_dir)
  if builder.is_prepared():
    stages.reused(builder.data_dir)
  else:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
  return manual, data_dir


def run(config, workdir: str, n_overlays: int = 4) -> dict:
  """Runs (or resumes) every stage; returns the summary."""
  # Every stage's library only now: --help answers at once.
  from midog_jax.data import dataset
  from midog_jax.evaluation import overlay
  from midog_jax.evaluation import runs
  from midog_jax.evaluation import score
  from midog_jax.training import inputs
  from midog_jax.training import trainer

  workdir = os.path.abspath(workdir)
  run_dir, report_dir = os.path.join(workdir, "run"), os.path.join(workdir, "report")
  summary_path = os.path.join(workdir, "summary.json")
  previous = atomic.read_json(summary_path) if os.path.exists(summary_path) else {}
  stages = Stages(previous.get("stage_seconds", {}))
  manual, data_dir = synthetic_data(config, workdir, stages)
  config.data_dir = data_dir

  stages.start(3, "training", f"training {config.experiment}, fold {config.fold}")
  result = trainer.train(config, run_dir, inputs.build(config))
  if result.summary.get("status") != "finished":
    raise SystemExit("training was interrupted; run the same command again to resume")

  stages.start(4, "evaluation", "detection and scoring (threshold chosen on the validation fold)")
  paths = runs.evaluate_all(workdir, report_dir, data_dir, compare_paper=True,
                            folds=(config.fold,))
  evaluation = atomic.read_json(os.path.join(run_dir, "evaluation.json"))
  test = evaluation["test"]

  stages.start(5, "overlays", "overlays")
  cases = dataset.read_cases(data_dir, "test")
  shown = sorted(cases, key=lambda c: -len(c.mitotic_figures))[:n_overlays]
  paths += overlay.write_case_overlays(
      os.path.join(report_dir, "overlays"), dataset.iterate_rois(data_dir, shown),
      os.path.join(run_dir, "predictions", "test.json"), evaluation["threshold"])
  seconds = stages.close()

  summary = {**runs.headline(evaluation), "test_cases": len(cases),
             "wall_seconds": round(sum(seconds.values()), 1), "stage_seconds": seconds,
             "paths": {"run": "run", "annotations": "data/manual/MIDOG++.json",
                       "splits": "data/manual/datasets_xvalidation.csv",
                       "tfds_data_dir": "data/tfds", "report": "report"},
             "report": sorted(os.path.relpath(p, workdir) for p in paths)}
  atomic.write_json(summary_path, summary)
  print(score.format_table({**test, "threshold": evaluation["threshold"]}))
  print(f"\npooled test F1 {summary['f1_overall']:.3f}, AP {summary['ap_overall']:.3f}; "
        f"stages took {console.format_duration(summary['wall_seconds'])}")
  print(f"run {run_dir}\nannotations {os.path.join(manual, 'MIDOG++.json')} (and "
        f"datasets_xvalidation.csv beside it)\nreport {report_dir}\nsummary {summary_path}")
  return summary
