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

import json
import os
import sys
import time

from absl import flags
from absl import logging as absl_logging  # noqa: F401  Defines --verbosity (-v).
from ml_collections import config_flags

from midog_jax import cli
from midog_jax import files

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
  import tensorflow_datasets as tfds
  from midog_jax import dataset, eval as eval_lib, overlay, predictions, run_data, run_eval
  from midog_jax import synthetic, trainer
  from tfds_midogpp.midogpp import midogpp_dataset_builder as builder_lib

  tty = cli.stderr_is_tty()
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
  result = trainer.train(config, run_dir, run_data.build(config))
  if result.summary.get("status") != "finished":
    raise SystemExit("training was interrupted; run the same command again to resume")

  _stage("4/5 detection and scoring (threshold chosen on the validation fold)")
  paths = run_eval.evaluate_all(workdir, report_dir, data_dir, compare_paper=True,
                                folds=(config.fold,))
  evaluation = json.load(open(os.path.join(run_dir, "evaluation.json"), encoding="utf-8"))
  test = evaluation["test"]
  print(eval_lib.format_table({**test, "threshold": evaluation["threshold"]}))

  _stage("5/5 overlays")
  os.makedirs(os.path.join(report_dir, "overlays"), exist_ok=True)
  cases = dataset.read_cases(data_dir, "test")
  shown = sorted(cases, key=lambda c: -len(c.mitotic_figures))[:n_overlays]
  found = predictions.read_predictions(
      os.path.join(run_dir, "predictions", "test.json"), {c.file_name: c.um_per_px for c in cases})
  for case, image in dataset.iterate_rois(data_dir, shown):
    path = os.path.join(report_dir, "overlays", case.file_name.replace(".tiff", ".png"))
    d = found[case.file_name]
    overlay.write_overlay(path, image, d.xy, case.mitotic_figures, case.um_per_px,
                          title=case.file_name, scores=d.scores, threshold=evaluation["threshold"])
    paths.append(path)

  summary = {
      "f1_overall": test["overall"]["f1"],
      "ap_overall": test["overall"]["ap"],
      "f1_by_tumor_type": {t: m["f1"] for t, m in test["tumor_types"].items()},
      "ap_by_tumor_type": {t: m["ap"] for t, m in test["tumor_types"].items()},
      "threshold": evaluation["threshold"],
      "test_cases": len(cases),
      "wall_seconds": time.time() - start,
      "report": sorted(os.path.relpath(p, workdir) for p in paths),
  }
  files.write_json(os.path.join(workdir, "summary.json"), summary)
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
  with cli.logging_to_stderr(cli.absl_verbosity()):
    run(_CONFIG.value, _WORKDIR.value, _OVERLAYS.value)
  return 0


if __name__ == "__main__":
  sys.exit(cli.absl_main(main, __name__, __doc__))
