"""The whole system on a synthetic MIDOG++, in one command.

  python -m midog_jax.demo [--workdir midog_demo] [--config configs/demo.py[:<tumour type>]]

Writes a synthetic MIDOG++ in the real formats (all 10 domains), builds it
with the real TFDS builder, trains with the real trainer, detects on the
test split with the real detector (threshold chosen on the validation
fold), scores it as the MIDOG challenge does and writes the report: a table
per tumour type, heatmap and overlay PNGs, and WORKDIR/summary.json.
Re-running reuses every stage already done. The same command runs on a GPU
or TPU. Output goes to ./midog_demo unless --workdir says otherwise. The
seeds are fixed: the same machine, core count and JAX version give the same
numbers; another one gives somewhat different ones (see README.md).
--config.FIELD=VALUE sets any field of the configuration; --verbosity=1
(-v 1) shows debug lines and other libraries' information.
"""

from __future__ import annotations

import os
import sys
import time

from absl import flags
from absl import logging as absl_logging  # noqa: F401  Defines --verbosity (-v).
from ml_collections import config_flags

from midog_jax import atomic
from midog_jax import console

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "demo.py")
_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Training config (configs/demo.py:<tumour type> for one type).",
    lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", "midog_demo", "Where data, run and report go "
                               "(relative to the current directory).")
_OVERLAYS = flags.DEFINE_integer("overlays", 4, "Test images drawn with their detections.")


def _stage(name: str) -> None:
  print(f"\n== {name}", flush=True)


def run(config, workdir: str, n_overlays: int = 4) -> dict:
  """Runs (or resumes) every stage; returns the summary."""
  # Every stage's library only now: --help answers at once.
  import tensorflow_datasets as tfds

  from midog_jax.data import dataset
  from midog_jax.data import synthetic
  from midog_jax.evaluation import overlay
  from midog_jax.evaluation import runs
  from midog_jax.evaluation import score
  from midog_jax.training import inputs
  from midog_jax.training import trainer
  from tfds_midogpp.midogpp import midogpp_dataset_builder as builder_lib

  tty = console.stderr_is_tty()
  if not tty:  # Bars are for terminals; a log file gets the trainer's lines.
    tfds.disable_progress_bar()
  start = time.time()
  workdir = os.path.abspath(workdir)
  manual, data_dir = os.path.join(workdir, "data", "manual"), os.path.join(workdir, "data", "tfds")
  run_dir, report_dir = os.path.join(workdir, "run"), os.path.join(workdir, "report")

  _stage("1/5 synthetic MIDOG++ (TIFFs, MIDOG++.json, datasets_xvalidation.csv)")
  s = config.synthetic
  if os.path.exists(os.path.join(manual, "datasets_xvalidation.csv")):
    print(f"reusing {manual}")
  else:
    synthetic.write_dataset(manual, s.cases_per_domain, s.width, s.height, seed=s.seed,
                            density_scale=s.density_scale, progress=tty)

  _stage("2/5 TFDS build (tfds build midogpp --imports tfds_midogpp --manual_dir ...)")
  builder = builder_lib.Builder(data_dir=data_dir)
  if builder.is_prepared():
    print(f"reusing {builder.data_dir}")
  else:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
  config.data_dir = data_dir

  _stage(f"3/5 training {config.experiment}, fold {config.fold}")
  result = trainer.train(config, run_dir, inputs.build(config))
  if result.summary.get("status") != "finished":
    raise SystemExit("training was interrupted; run the same command again to resume")

  _stage("4/5 detection and scoring (threshold chosen on the validation fold)")
  paths = runs.evaluate_all(workdir, report_dir, data_dir, compare_paper=True,
                            folds=(config.fold,))
  evaluation = atomic.read_json(os.path.join(run_dir, "evaluation.json"))
  test = evaluation["test"]
  print(score.format_table({**test, "threshold": evaluation["threshold"]}))

  _stage("5/5 overlays")
  cases = dataset.read_cases(data_dir, "test")
  shown = sorted(cases, key=lambda c: -len(c.mitotic_figures))[:n_overlays]
  paths += overlay.write_case_overlays(
      os.path.join(report_dir, "overlays"), dataset.iterate_rois(data_dir, shown),
      os.path.join(run_dir, "predictions", "test.json"), evaluation["threshold"])

  summary = {**runs.headline(evaluation), "test_cases": len(cases),
             "wall_seconds": time.time() - start,
             "report": sorted(os.path.relpath(p, workdir) for p in paths)}
  atomic.write_json(os.path.join(workdir, "summary.json"), summary)
  print(f"\npooled test F1 {summary['f1_overall']:.3f}, AP {summary['ap_overall']:.3f} "
        f"in {summary['wall_seconds']:.0f} s; report in {report_dir}, summary in "
        f"{os.path.join(workdir, 'summary.json')}")
  return summary


def main(argv) -> int:
  """Runs the demo with the parsed flags (also callable by `absl.app.run`)."""
  if len(argv) > 1:
    print(f"error: unexpected arguments {' '.join(argv[1:])} (see python -m midog_jax.demo "
          "--help)", file=sys.stderr)
    return 2
  with console.logging_to_stderr(console.absl_verbosity()):
    run(_CONFIG.value, _WORKDIR.value, _OVERLAYS.value)
  return 0


if __name__ == "__main__":
  sys.exit(console.absl_main(main, __name__, __doc__))
