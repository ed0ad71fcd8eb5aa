"""Time to reproduce the paper: 75 trainings plus their evaluation.

    python benchmarks/reproduce_time.py                      # this CPU's figures
    python benchmarks/reproduce_time.py --train-img-s 2000 --forward-img-s 9000 \
        --detect-windows-s 12000 --host-patches-s 2160 --compile-s 60
    python benchmarks/reproduce_time.py ... --group 5 --group-img-s 3000   # run groups

Arithmetic only, from measured rates given as flags (defaults: figures
measured on a 2-core Intel Xeon CPU, see benchmarks/README.md). Assumptions,
all printed: 15 experiments x 5 folds; per epoch the reference's 1,000
training patches (batch 12, the tail dropped) and its validation: the loss
on 250 fixed patches plus the selection AP on 250 patches drawn afresh
(forward pass, then per-patch bookkeeping on the host); host cropping runs in
a thread beside the device, so a phase takes the longer of the two; one
compilation per run; after training, every run detects its validation fold's
ROIs (threshold choice) and the 111 test ROIs. ROI decoding (PNG, ~1.1 s per
full-size ROI) is counted two ways: once per ROI (`roi_store` "disk", the
decoded copy shared by all runs, `midog_jax/data/roi_store.py`), and per run
(`roi_store` "ram": each training process decodes its own cases; evaluation,
one process with one ROI cache for all runs, decodes every ROI once).

Run groups (`--group K`, `experiments run --group K`): K runs train in one
program at `--group-img-s` images/s for the K together (benchmarks/
group_step.py measures it), their host crops at `--host-patches-s` for all
K; validation, checkpoints and model selection stay per run, one after
another; one compilation of the group's step per group, and each run's
validation programs (`--member-compile-s`: they hold its normalisation, so
each run compiles its own); runs of a group take as long as its longest,
taken here as all of the same length.
"""

from __future__ import annotations

import argparse

TRAIN_CASES, TEST_CASES, ALL_CASES = 392, 111, 503
# Cases trained on, summed over the 15 experiments: the 7 single-type ones
# cover the 392 cases once, the 7 leave-one-out ones six times, all types once.
EXPERIMENT_CASES = 8 * TRAIN_CASES


def _hours(seconds: float) -> str:
  return f"{seconds / 3600:8.2f} h"


def estimate(a) -> dict[str, float]:
  """Seconds of each part, for the whole reproduction on `a.devices` devices.

  With `a.group` K > 1 the epoch and run times are those of a group of K
  runs (training K runs at `a.group_img_s` images/s, then each run's
  validation and checkpoint).
  """
  k = a.group
  rate = a.group_img_s or a.train_img_s  # Images/s of the K runs together.
  steps = a.train_patches // a.batch
  trained = k * steps * a.batch
  train_epoch = max(trained / rate, trained / a.host_patches_s)
  valid_device = max(2 * a.valid_patches / a.forward_img_s,
                     2 * a.valid_patches / a.host_patches_s)
  valid_epoch = k * (valid_device + a.valid_patches * a.selection_host_ms / 1e3)
  run = (a.epochs * (train_epoch + valid_epoch + k * a.checkpoint_s) + a.compile_s
         + (k * a.member_compile_s if k > 1 else 0.0))
  valid_rois = EXPERIMENT_CASES  # Each case is in one validation fold per experiment.
  test_rois = a.runs * TEST_CASES
  detect = (valid_rois + test_rois) * a.windows_per_roi / a.detect_windows_s
  return {
      "train_epoch": train_epoch, "valid_epoch": valid_epoch, "run": run,
      "training": -(-a.runs // k) * run / a.devices,
      "validation_share": valid_epoch / (train_epoch + valid_epoch + k * a.checkpoint_s),
      "evaluation": detect / a.devices,
      "decode_once": ALL_CASES * a.decode_s / a.decode_workers,
      "decode_per_run": (a.folds * EXPERIMENT_CASES + ALL_CASES) * a.decode_s
                        / a.decode_workers,
      "valid_rois": valid_rois, "test_rois": test_rois,
  }


def main(argv=None) -> dict[str, float]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--train-img-s", type=float, default=0.8,
                 help="train step, images/s (CPU: 512 px, batch 4, float32)")
  p.add_argument("--forward-img-s", type=float, default=4.8, help="forward pass, images/s")
  p.add_argument("--detect-windows-s", type=float, default=6.8,
                 help="sliding-window detection, windows/s")
  p.add_argument("--host-patches-s", type=float, default=1485.0,
                 help="host cropping, patches/s (input_pipeline.py, cached)")
  p.add_argument("--selection-host-ms", type=float, default=0.54,
                 help="host bookkeeping of the selection AP per patch")
  p.add_argument("--compile-s", type=float, default=30.0, help="compilation per run")
  p.add_argument("--checkpoint-s", type=float, default=0.0,
                 help="checkpoint per epoch (not measured; 0 leaves it out)")
  p.add_argument("--decode-s", type=float, default=1.1, help="PNG decode per full-size ROI")
  p.add_argument("--decode-workers", type=int, default=1)
  p.add_argument("--devices", type=int, default=1,
                 help="devices side by side, each training a run (or a group) at a time")
  p.add_argument("--group", type=int, default=1,
                 help="runs trained together on a device as a run group")
  p.add_argument("--member-compile-s", type=float, default=0.0,
                 help="compilation of each run's validation programs in a group (0: left out)")
  p.add_argument("--group-img-s", type=float, default=None,
                 help="train step of a group, images/s of all its runs together "
                 "(benchmarks/group_step.py; default: --train-img-s, no gain)")
  p.add_argument("--runs", type=int, default=75)
  p.add_argument("--folds", type=int, default=5)
  p.add_argument("--epochs", type=int, default=100)
  p.add_argument("--train-patches", type=int, default=1000)
  p.add_argument("--valid-patches", type=int, default=250)
  p.add_argument("--batch", type=int, default=12)
  p.add_argument("--windows-per-roi", type=int, default=192,
                 help="512 px windows at 10 %% overlap in a 7215 x 5412 ROI")
  a = p.parse_args(argv)
  e = estimate(a)

  print("assumptions:")
  print(f"  {a.runs} runs ({a.runs // a.folds} experiments x {a.folds} folds), {a.epochs} epochs, "
        f"{a.train_patches // a.batch * a.batch} training patches per epoch at batch {a.batch}")
  print(f"  validation per epoch: loss on {a.valid_patches} patches + selection AP on "
        f"{a.valid_patches} fresh patches ({a.selection_host_ms} ms host work each)")
  print(f"  rates: train {a.train_img_s:g} img/s, forward {a.forward_img_s:g} img/s, detect "
        f"{a.detect_windows_s:g} windows/s, host crops {a.host_patches_s:g} patches/s; "
        f"compile {a.compile_s:g} s per {'group' if a.group > 1 else 'run'}; checkpoint "
        f"{a.checkpoint_s:g} s per epoch")
  if a.group > 1:
    rate = a.group_img_s or a.train_img_s
    print(f"  run groups of {a.group}: {rate:g} img/s for the {a.group} runs together "
          f"({rate / a.group:g} per run), validation and checkpoints per run; "
          f"{-(-a.runs // a.group)} groups; {a.member_compile_s:g} s compilation per run")
  print(f"  evaluation: {e['valid_rois']} validation + {e['test_rois']} test ROI detections, "
        f"{a.windows_per_roi} windows each; {a.devices} device(s) side by side")
  print(f"  ROI decoding: {a.decode_s:g} s per ROI on {a.decode_workers} worker(s)")
  print("estimate:")
  what = f"of a group of {a.group} runs" if a.group > 1 else ""
  print(f"  per epoch{' ' + what if what else ''}: train {e['train_epoch']:.2f} s, validation "
        f"{e['valid_epoch']:.2f} s ({100 * e['validation_share']:.0f} % of the epoch)")
  print(f"  per {'group' if a.group > 1 else 'run'}: {_hours(e['run'])}")
  print(f"  {a.runs} trainings:        {_hours(e['training'])}")
  print(f"  evaluation:          {_hours(e['evaluation'])}")
  print(f"  ROI decoding once:   {_hours(e['decode_once'])}  ({ALL_CASES} ROIs, store on disk)")
  print(f"  ROI decoding per run:{_hours(e['decode_per_run'])}  "
        f"(store in RAM: {a.folds * EXPERIMENT_CASES} in training + {ALL_CASES} in evaluation)")
  total = e["training"] + e["evaluation"]
  print(f"  total, decoding once:    {_hours(total + e['decode_once'])}")
  print(f"  total, decoding per run: {_hours(total + e['decode_per_run'])}")
  verdict = "dominates" if e["validation_share"] > 0.5 else "does not dominate"
  print(f"validation per epoch {verdict} ({100 * e['validation_share']:.0f} % of an epoch)")
  return e


if __name__ == "__main__":
  main()
