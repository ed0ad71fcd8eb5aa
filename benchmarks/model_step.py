"""Images per second of the RetinaNet train step and forward pass.

    python benchmarks/model_step.py --patch 512 --batch 64 --dtype bfloat16

Random images and 50 x 50 px boxes; AdamW; warm-up steps (compilation
included) are not timed, then `--steps` timed iterations end with
`block_until_ready`. Also prints FLOPs per image from XLA's cost analysis,
model FLOP utilisation (see `flops.py`) and the rate per device.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import optax

import flops as flops_lib  # benchmarks/flops.py, next to this file.
from midog_jax import atomic
from midog_jax import sharding
from midog_jax.model import backbones
from midog_jax.model import retinanet
from midog_jax.training import steps


def fake_batch(batch: int, patch: int, boxes: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(batch, patch, patch, 3)).astype(np.float32)
  centres = rng.uniform(25, patch - 25, (batch, boxes, 2))
  gt = np.concatenate([centres - 25, centres + 25], -1).astype(np.float32)
  valid = rng.uniform(size=(batch, boxes)) < 0.5
  return images, gt, valid


def time_calls(fn, warmup: int, iters: int) -> float:
  """Seconds per call of `fn` after `warmup` calls."""
  out = None
  for _ in range(warmup):
    out = fn()
  jax.block_until_ready(out)
  start = time.perf_counter()
  for _ in range(iters):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / iters


def main(argv=None) -> dict[str, float]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--patch", type=int, default=512)
  parser.add_argument("--batch", type=int, default=64, help="global batch")
  parser.add_argument("--dtype", default="bfloat16",
                      choices=["float32", "bfloat16"])
  parser.add_argument("--devices", type=int, default=1)
  parser.add_argument("--levels", type=int, nargs="+", default=[4])
  parser.add_argument("--backbone", default=backbones.DEFAULT, choices=sorted(backbones.BACKBONES),
                      help="the body (default the reference's)")
  parser.add_argument("--channels", type=int, default=retinanet.RetinaNetConfig.channels,
                      help="FPN and head width (default the reference's)")
  parser.add_argument("--boxes", type=int, default=16,
                      help="padded ground-truth boxes per image")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--mode", choices=["both", "train", "forward"],
                      default="both")
  parser.add_argument("--peak-tflops", type=float, default=None,
                      help="peak TFLOP/s per device for MFU (default: flops.py's table)")
  parser.add_argument("--json", default=None, help="also write the results here")
  parser.add_argument("--profile", default=None,
                      help="after timing, trace --steps more calls into this directory")
  args = parser.parse_args(argv)

  devices = jax.devices()[:args.devices]
  if len(devices) < args.devices or args.batch % args.devices:
    parser.error(f"need {args.devices} devices dividing the batch; have "
                 f"{len(jax.devices())}")
  mesh = sharding.make_mesh(devices)
  config = retinanet.RetinaNetConfig(levels=tuple(args.levels), dtype=args.dtype,
                                     backbone=args.backbone, channels=args.channels)
  model = retinanet.build_model(config)
  images, gt, valid = sharding.shard_batch(
      fake_batch(args.batch, args.patch, args.boxes), mesh)
  print(f"device: {devices[0].device_kind} x {len(devices)}, patch "
        f"{args.patch}, batch {args.batch}, {args.dtype}, levels "
        f"{config.levels}, {config.backbone} with {config.channels} channels")

  results = {"device_kind": devices[0].device_kind, "devices": len(devices),
             "patch": args.patch, "batch": args.batch, "dtype": args.dtype}
  if args.mode in ("both", "train"):
    tx = optax.adamw(1e-4, b1=0.9, b2=0.99, weight_decay=0.01)
    graphdef, state = steps.init_train_state(model, tx)
    holder = [sharding.replicate(state, mesh)]
    train_step = steps.make_train_step(graphdef, tx, mesh=mesh)

    def train():
      holder[0], metrics = train_step(holder[0], images, gt, valid)
      return metrics

    seconds = time_calls(train, args.warmup, args.steps)
    if args.profile:  # Traced apart, so the timing above carries no tracing cost.
      with jax.profiler.trace(args.profile):
        time_calls(train, 0, args.steps)
    results["train"] = args.batch / seconds
    print(f"train:   {results['train']:.1f} img/s "
          f"({seconds * 1e3:.1f} ms/step)")
    total = flops_lib.compiled_flops(train_step, holder[0], images, gt, valid,
                                     n_devices=len(devices))
    results["train_cost"] = flops_lib.report(
        "train", total and total / args.batch, results["train"], devices, args.dtype,
        args.peak_tflops)

  if args.mode in ("both", "forward"):
    graphdef, params, stats = steps.split_model(model)
    params, stats = sharding.replicate((params, stats), mesh)
    forward = retinanet.make_forward(graphdef, mesh=mesh)
    seconds = time_calls(lambda: forward(params, stats, images), args.warmup,
                    args.steps)
    results["forward"] = args.batch / seconds
    print(f"forward: {results['forward']:.1f} img/s "
          f"({seconds * 1e3:.1f} ms/batch)")
    total = flops_lib.compiled_flops(forward, params, stats, images, n_devices=len(devices))
    results["forward_cost"] = flops_lib.report(
        "forward", total and total / args.batch, results["forward"], devices, args.dtype,
        args.peak_tflops)
  if args.json:
    atomic.write_json(args.json, results)
  return results


if __name__ == "__main__":
  main()
