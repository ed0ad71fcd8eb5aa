"""The full training loop against its bare jitted step, same batch size.

    python benchmarks/trainer_overhead.py --patch 512 --batch 12 --dtype bfloat16

Loop: `trainer.train` (host input pipeline with prefetch, on-device
augmentation, loss logging, per-epoch validation loss and checkpoint) fed by
`input_pipeline.PatchInput` from synthetic ROIs held in host RAM (random
uint8 images with random object positions: nothing is decoded, so this
measures what a run costs once its ROI cache is full). Its speed is the
training images of an epoch over the epoch's `epoch_seconds` (which leaves
out the validation and the checkpoint), median over the epochs after the
first (compilation).

Bare step: the same jitted `trainer.make_train_step` (augmentation included)
called on one batch already on the devices, after warm-up.

Imports no TensorFlow (it is kept out, so the metric writer writes JSON lines
only, as on a machine without TensorFlow).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.modules.setdefault("tensorflow", None)  # `import tensorflow` now fails fast.

import jax  # noqa: E402
import numpy as np  # noqa: E402

import random_inputs  # noqa: E402  benchmarks/random_inputs.py, beside this script.
from configs import default  # noqa: E402
from midog_jax import atomic
from midog_jax import sharding
from midog_jax.data import input_pipeline
from midog_jax.data import normalization  # noqa: E402
from midog_jax.model import retinanet as model_lib
from midog_jax.training import inputs
from midog_jax.training import optim
from midog_jax.training import steps
from midog_jax.training import trainer


def make_config(args):
  config = default.get_config()
  config.patch_size, config.batch_size = args.patch, args.batch
  config.model.dtype, config.model.body_weights = args.dtype, "none"
  config.train_patches_per_epoch = args.patches
  config.valid_patches_per_epoch = args.batch * 2
  config.num_epochs = args.epochs
  config.eval.every_epochs = 0  # Selection AP is its own cost (reproduce_time.py).
  config.prefetch = args.prefetch
  return config


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--patch", type=int, default=512)
  parser.add_argument("--batch", type=int, default=12, help="global batch")
  parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
  parser.add_argument("--patches", type=int, default=1000, help="training patches per epoch")
  parser.add_argument("--epochs", type=int, default=4)
  parser.add_argument("--cases", type=int, default=8)
  parser.add_argument("--roi", type=int, default=2048, help="side of each synthetic ROI")
  parser.add_argument("--prefetch", type=int, default=2)
  parser.add_argument("--steps", type=int, default=20, help="timed bare steps")
  parser.add_argument("--workdir", default=None, help="default: a temporary directory")
  parser.add_argument("--json", default=None, help="also write the results here")
  args = parser.parse_args(argv)

  devices = jax.devices()
  mesh = sharding.make_mesh(devices)
  config = make_config(args)
  cases, rois = random_inputs.random_cases(args.cases, args.roi, 40)
  norm = normalization.Normalization((200.0, 150.0, 200.0), (40.0, 40.0, 30.0))
  common = dict(patch_size=args.patch, global_batch_size=args.batch, seed=0, mesh=mesh,
                prefetch=args.prefetch, cache_bytes=sum(r.nbytes for r in rois.values()) + 1)
  train_input = input_pipeline.PatchInput(cases, rois.__getitem__,
                                          patches_per_epoch=args.patches, **common)
  valid_input = input_pipeline.PatchInput(
      cases, None, patches_per_epoch=config.valid_patches_per_epoch, validation=True,
      cache=train_input.cache, max_objects=train_input.max_objects, **common)
  data = inputs.RunData(train=train_input, valid=valid_input, normalization=norm,
                        validation_ap=None, meta={"benchmark": "trainer_overhead"})
  for c in cases:  # Fill the cache first: the loop should not pay for it.
    train_input.cache.get(c.case_id)
  per_epoch = train_input.steps_per_epoch
  print(f"device: {devices[0].device_kind} x {len(devices)}; patch {args.patch}, batch "
        f"{args.batch}, {args.dtype}; {per_epoch} steps per epoch, {args.epochs} epochs")

  with tempfile.TemporaryDirectory() as tmp:
    workdir = args.workdir or os.path.join(tmp, "run")
    trainer.train(config, workdir, data, mesh)
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      records = [json.loads(line) for line in f]
  epoch_seconds = [r["epoch_seconds"] for r in records]
  loop = per_epoch * args.batch / float(np.median(epoch_seconds[1:] or epoch_seconds))

  # The bare step: same model, optimiser and jitted function, one batch on the devices.
  model = model_lib.build_model(model_lib.RetinaNetConfig.from_config(config))
  tx = optim.make_optimizer(per_epoch * args.epochs, max_lr=config.optim.max_lr)
  graphdef, state = steps.init_train_state(model, tx)
  holder = [sharding.replicate(state, mesh)]
  step = steps.make_batch_train_step(graphdef, tx, config, norm, mesh)
  batch = next(iter(train_input.batches(0, epochs=1)))
  key = jax.random.key(0)

  def run(n):
    for i in range(n):
      holder[0], metrics = step(holder[0], batch, jax.random.fold_in(key, i))
    jax.block_until_ready(metrics)

  run(3)
  start = time.perf_counter()
  run(args.steps)
  bare = args.steps * args.batch / (time.perf_counter() - start)

  results = {"device_kind": devices[0].device_kind, "devices": len(devices),
             "patch": args.patch, "batch": args.batch, "dtype": args.dtype,
             "steps_per_epoch": per_epoch, "epoch_seconds": epoch_seconds,
             "loop": loop, "bare": bare, "ratio": loop / bare,
             "loop_per_device": loop / len(devices), "bare_per_device": bare / len(devices)}
  print(f"epoch seconds: {', '.join(f'{s:.2f}' for s in epoch_seconds)}")
  print(f"loop:  {loop:,.1f} img/s ({loop / len(devices):,.1f} per device)")
  print(f"bare:  {bare:,.1f} img/s ({bare / len(devices):,.1f} per device)")
  print(f"ratio loop/bare: {loop / bare:.2f}")
  if args.json:
    atomic.write_json(args.json, results)
  return results


if __name__ == "__main__":
  main()
