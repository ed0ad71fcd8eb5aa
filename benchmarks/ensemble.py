"""Cost of an ensemble per window against one model: M members in one vmapped call.

    python benchmarks/ensemble.py --patch 512 --batch 16 --members 1,2,5 [--dtype bfloat16]

Random-initialised members (the speed does not depend on the weights), the
jitted window function of `EnsembleDetector` against M calls of one model's
detector, after warm-up, on random uint8 windows. Prints windows/s and the
cost per window relative to one model.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from configs import default

from midog_jax.data import normalization
from midog_jax.detection import detector
from midog_jax.detection import ensemble
from midog_jax.model import retinanet
from midog_jax.training import steps


def _run(seed: int, patch: int, dtype: str, batch: int) -> detector.LoadedRun:
  """A random-initialised member of the reference's network."""
  config = default.get_config()
  config.patch_size, config.eval.batch_size, config.model.dtype = patch, batch, dtype
  config.model.body_weights = "none"
  model = retinanet.build_model(retinanet.RetinaNetConfig.from_config(config, pretrained=False),
                                seed=seed)
  graphdef, params, batch_stats = steps.split_model(model)
  norm = normalization.Normalization((200.0, 150.0, 200.0), (40.0, 40.0, 30.0))
  return detector.LoadedRun(f"member{seed}", 0, config, norm, graphdef, params, batch_stats)


def _rate(fn, windows, steps_: int) -> float:
  jax.block_until_ready(fn(windows))  # Compile and warm up.
  start = time.perf_counter()
  for _ in range(steps_):
    out = fn(windows)
  jax.block_until_ready(out)
  return steps_ * len(windows) / (time.perf_counter() - start)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--patch", type=int, default=512, help="window size in px")
  parser.add_argument("--batch", type=int, default=16, help="windows per call")
  parser.add_argument("--members", default="1,2,5", help="ensemble sizes to time")
  parser.add_argument("--dtype", default="float32", help="compute dtype (bfloat16 on accelerators)")
  parser.add_argument("--steps", type=int, default=5, help="timed calls per size")
  parser.add_argument("--json", default=None, help="also write the results here")
  args = parser.parse_args(argv)
  windows = np.random.default_rng(0).integers(0, 256, (args.batch, args.patch, args.patch, 3),
                                               np.uint8)
  sizes = [int(m) for m in args.members.split(",")]
  runs = [_run(k, args.patch, args.dtype, args.batch) for k in range(max(sizes))]
  single = detector.Detector(runs[0], batch_size=args.batch)
  one = _rate(lambda w: single._fn(single._weights[0], single._weights[1], w), windows, args.steps)
  print(f"{jax.devices()[0].device_kind}, {args.patch} px, batch {args.batch}, {args.dtype}")
  print(f"one model: {one:.3g} windows/s")
  results = {"one_model_windows_s": one, "ensembles": {}}
  for m in sizes:
    ens = ensemble.EnsembleDetector(runs[:m], batch_size=args.batch)
    rate = _rate(ens.member_windows, windows, args.steps)
    results["ensembles"][m] = {"windows_s": rate, "cost_per_window_vs_one": one / rate}
    print(f"{m} members in one call: {rate:.3g} windows/s, {one / rate:.2f} x one model's cost "
          f"per window (M calls of one model: {m:.0f} x)")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=1)
  return results


if __name__ == "__main__":
  main()
