"""Leave-one-scanner-out F1 on the synthetic MIDOG++ with each stain switch.

    python benchmarks/stain_experiment.py --workdir /tmp/stain_experiment

The synthetic scanners differ in stain (the generator shifts Ruifrok's
vectors per scanner and lab). For each breast-carcinoma scanner left out
(domains 1a, 1b, 1c) and each switch (none, the paper's; HED light;
RandStainNA in L*a*b*; Macenko), one run of configs/leave_one_domain_out.py
trains on the other two scanners with the same seed and budget (fold 0),
then `eval --runs` scores every test domain. Prints the held-out table
(report/domain_experiments.md has it with the full matrices) and the time
each run took. A second call reuses finished runs.

Synthetic stain shifts are simpler than real ones (one linear change of two
stain vectors per scanner, no blur, no tissue differences), and tiny
budgets give noisy F1: read the table as a check that the switches work
end to end, not as evidence of what they do on MIDOG++.
"""

from __future__ import annotations

import argparse
import os
import time

import tensorflow_datasets as tfds

from configs import demo
from configs import leave_one_domain_out
from midog_jax import atomic
from midog_jax.data import synthetic
from midog_jax.evaluation import domain_experiments
from midog_jax.evaluation import runs
from midog_jax.training import inputs
from midog_jax.training import trainer
from tfds_midogpp.midogpp import midogpp_dataset_builder as builder_lib

# The demo's budget, except what the command line sets.
_BUDGET = ("batch_size", "valid_patches_per_epoch", "cache_bytes", "stream_window",
           "log_every_steps")


def dataset(workdir: str, cases_per_domain: int, width: int, height: int) -> str:
  """Writes and builds the synthetic MIDOG++ once; its TFDS data dir."""
  manual, data_dir = os.path.join(workdir, "data", "manual"), os.path.join(workdir, "data", "tfds")
  if not os.path.exists(os.path.join(manual, "datasets_xvalidation.csv")):
    synthetic.write_dataset(manual, cases_per_domain, width, height, seed=0,
                            density_scale=40.0, progress=False)
  builder = builder_lib.Builder(data_dir=data_dir)
  if not builder.is_prepared():
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
  return data_dir


def config_for(left_out: str, switch: str, data_dir: str, args) -> object:
  config = leave_one_domain_out.get_config(f"{left_out},{switch}")
  small = demo.get_config()
  for key in _BUDGET:
    config[key] = small[key]
  config.optim.max_lr = small.optim.max_lr
  config.model.body_weights = "none"
  config.eval.update(batch_size=small.eval.batch_size, selection="roi_ap")
  config.update(data_dir=data_dir, patch_size=args.patch, num_epochs=args.epochs,
                train_patches_per_epoch=args.patches, seed=args.seed)
  return config


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="data, runs and report go here")
  parser.add_argument("--left-out", nargs="+", default=["1a", "1b", "1c"],
                      help="domains left out, one run per switch each")
  parser.add_argument("--switches", nargs="+", default=list(leave_one_domain_out.PLAN_SWITCHES),
                      choices=list(leave_one_domain_out.SWITCHES), help="stain switches compared")
  parser.add_argument("--cases-per-domain", type=int, default=15,
                      help="synthetic cases per domain (a fifth of them test cases)")
  parser.add_argument("--image", type=int, nargs=2, default=(512, 384), metavar=("W", "H"),
                      help="synthetic ROI size")
  parser.add_argument("--patch", type=int, default=128, help="patch side")
  parser.add_argument("--patches", type=int, default=128, help="training patches per epoch")
  parser.add_argument("--epochs", type=int, default=5, help="epochs per run")
  parser.add_argument("--seed", type=int, default=0, help="every run's seed")
  parser.add_argument("--json", default=None, help="also write the held-out table here")
  args = parser.parse_args(argv)

  t = time.perf_counter()
  data_dir = dataset(args.workdir, args.cases_per_domain, *args.image)
  print(f"synthetic MIDOG++: {time.perf_counter() - t:.0f} s ({data_dir})", flush=True)
  root = os.path.join(args.workdir, "runs")
  seconds = {}
  for name, spec in leave_one_domain_out.plan(args.left_out, args.switches):
    left_out, switch = spec.partition("=")[2].split(",")
    t = time.perf_counter()
    config = config_for(left_out, switch, data_dir, args)
    result = trainer.train(config, os.path.join(root, name, "fold0"), inputs.build(config))
    if result.summary.get("status") != "finished":
      raise SystemExit("a run was interrupted; run the same command again to resume")
    seconds[name] = time.perf_counter() - t
    print(f"{name}: {seconds[name]:.0f} s", flush=True)
  t = time.perf_counter()
  report = os.path.join(args.workdir, "report")
  runs.evaluate_all(root, report, data_dir, folds=(0,))
  print(f"evaluation: {time.perf_counter() - t:.0f} s", flush=True)
  with open(os.path.join(report, "domain_experiments.md"), encoding="utf-8") as f:
    print(f.read().split("## Domain matrix")[0])
  table = {}
  for r in atomic.read_json(os.path.join(report, "runs.json")):
    train = domain_experiments.is_domain_experiment(r["experiment"]) and r["experiment"]
    for d in domain_experiments.held_out(train[len(domain_experiments.DOMAIN_PREFIX):]):
      table.setdefault(d, {})[r["variant"]] = r["test_domains"].get(d, {}).get("f1")
  if args.json:
    atomic.write_json(args.json, {"held_out_f1": table, "run_seconds": seconds})
  return table


if __name__ == "__main__":
  main()
