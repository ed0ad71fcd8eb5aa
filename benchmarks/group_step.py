"""Images per second of a run group's train step, against its runs one after another.

    python benchmarks/group_step.py --patch 512 --batch 12 --dtype bfloat16 --groups 1,2,5,8,15

The trainer's own programs on the device: a single run's step
(`steps.make_batch_train_step`: augmentation, forward, backward, AdamW on
one-cycle schedules) called once per run ("one after another"), and a
group of K runs' step (`steps.make_group_train_step`: K runs' states
stacked, their passes mapped over the run axis), each fed batches of the
input pipeline already on the device. Warm-up calls (compilation included)
are not timed; then `--rounds` rounds each time the single step and the
group's step in turn, and the best round of each counts (on a shared
machine both meet the same spells of load). Per K it prints images/s, ms
per step, the speed-up over one after another, and XLA's memory per run
(arguments, outputs and temporaries of the compiled step, over K; with
`--steps 0` only that, the device's step is not run); `--unmapped 2,5` also times those
groups with each run's passes one after another in its program instead of mapped
over the runs (no batched convolution: where a backend's batched
convolutions are slow, this may be faster); `--host-steps` also times the host: K input
pipelines (`input_pipeline.PatchInput`, threads as the trainer's, on random
ROIs held in RAM) cropping together, against the crops per second the
group's step consumes. Nothing it imports needs TensorFlow (an
accelerator host may lack it).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import random_inputs  # benchmarks/random_inputs.py, beside this script.
from configs import default
from midog_jax import atomic
from midog_jax import sharding
from midog_jax.data import crops
from midog_jax.data import input_pipeline
from midog_jax.data import normalization
from midog_jax.data import roi_store
from midog_jax.model import retinanet
from midog_jax.training import optim
from midog_jax.training import steps

NORM = normalization.Normalization((200.0, 150.0, 200.0), (40.0, 40.0, 30.0))


def make_config(args):
  config = default.get_config()
  config.patch_size, config.batch_size = args.patch, args.batch
  config.model.dtype, config.model.body_weights = args.dtype, "none"
  config.model.backbone = args.backbone
  return config


def time_calls(fn, warmup: int, iters: int) -> float:
  """Seconds per call of `fn()` after `warmup` calls (none timed: 0)."""
  out = None
  for _ in range(warmup):
    out = fn()
  jax.block_until_ready(out)
  if not iters:
    return 0.0
  start = time.perf_counter()
  for _ in range(iters):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / iters


def memory_bytes(compiled) -> int | None:
  """Arguments, outputs and temporaries of a compiled program (None if XLA does not say)."""
  try:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)
  except (AttributeError, NotImplementedError, TypeError):
    return None


def host_rate(pipes, steps_: int) -> float:
  """Crops per second of `pipes` prepared together, as a group's trainer draws them."""
  iters = [p.batches(0) for p in pipes]
  for it in iters:  # Threads started, first batches out of the way.
    next(it)
  start = time.perf_counter()
  for _ in range(steps_):
    jax.block_until_ready([next(it) for it in iters])
  return steps_ * len(pipes) * pipes[0].global_batch_size / (time.perf_counter() - start)


def _time_group(args, k, graphdef, tx, config, state, batches, mesh, one, pipeline,
                mapped: bool = True):
  """One group size's figures (see the module docstring); `one()` is a single run's step."""
  step = steps.make_group_train_step(graphdef, [(tx, tuple(range(k)))], config, [NORM] * k,
                                     mesh, mapped=mapped)
  stacked = [jax.tree.map(lambda *xs: jnp.stack(xs), *([state] * k))]
  keys = jnp.stack([jax.random.key(i) for i in range(k)])
  run_steps, active = np.zeros(k, np.int32), np.ones(k, bool)
  group_batches = tuple(batches[:k])
  # Compiled ahead, so that its memory is read off the program that is timed.
  compiled = step.lower(stacked[0], group_batches, keys, run_steps, active).compile()
  bytes_ = memory_bytes(compiled)

  def call():
    stacked[0], metrics = compiled(stacked[0], group_batches, keys, run_steps, active)
    return metrics

  memory = f"{bytes_ / k / 2**30:.2f} GiB per run" if bytes_ else "memory not reported"
  what = f"group of {k:2d}" + ("" if mapped else ", unmapped")
  row = {"bytes_per_run": bytes_ and bytes_ / k}
  if args.steps:
    time_calls(call, args.warmup, 0)
    single_s, seconds = float("inf"), float("inf")
    for _ in range(args.rounds):  # In turn: both meet the same load.
      single_s = min(single_s, time_calls(one, 0, args.steps))
      seconds = min(seconds, time_calls(call, 0, args.steps))
    sequential, rate = args.batch / single_s, k * args.batch / seconds
    row.update(img_s=rate, step_ms=seconds * 1e3, sequential_img_s=sequential,
               single_step_ms=single_s * 1e3, speedup=rate / sequential)
    print(f"{what}: {rate:,.1f} img/s ({seconds * 1e3:.1f} ms per step) against "
          f"{sequential:,.1f} img/s one after another ({single_s * 1e3:.1f} ms per run's "
          f"step): x{rate / sequential:.2f}; {memory}")
  else:
    print(f"{what}: {memory}")
  if args.host_steps and mapped:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = max(1, (cores or 1) // k)  # What the launcher gives each run of a group.
    crops_s = host_rate([pipeline(i, workers) for i in range(k)], args.host_steps)
    row.update(host_crops_s=crops_s, host_workers_per_run=workers)
    needed = ""
    if "img_s" in row:
      row["bottleneck"] = "device" if crops_s >= row["img_s"] else "host"
      needed = f" for {row['img_s']:,.0f} needed: the {row['bottleneck']} sets the pace"
    print(f"  host: {crops_s:,.0f} crops/s from {k} pipelines ({workers} worker(s) each, "
          f"{crops.default_workers()} cores usable){needed}")
  return row


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--patch", type=int, default=512, help="patch side in pixels")
  parser.add_argument("--batch", type=int, default=12, help="batch per run (the paper's 12)")
  parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                      help="compute dtype (float32 parameters either way)")
  parser.add_argument("--groups", default="1,2,5,8,15",
                      help="comma-separated group sizes K to time")
  parser.add_argument("--backbone", default="resnet18", help="a key of model/backbones.py")
  parser.add_argument("--devices", type=int, default=1, help="devices the batches are split over")
  parser.add_argument("--warmup", type=int, default=2, help="untimed calls (compilation)")
  parser.add_argument("--steps", type=int, default=10,
                      help="timed calls per round (0: compile and report memory only)")
  parser.add_argument("--rounds", type=int, default=3,
                      help="rounds of single and group timings in turn; the best counts")
  parser.add_argument("--unmapped", default="",
                      help="comma-separated group sizes also timed with their runs one after "
                      "another in the group's program (not mapped over the runs)")
  parser.add_argument("--host-steps", type=int, default=0,
                      help="also time the host's cropping for this many group steps (0: no)")
  parser.add_argument("--cases", type=int, default=4, help="random ROIs per pipeline")
  parser.add_argument("--roi", type=int, default=2048, help="side of each random ROI")
  parser.add_argument("--json", default=None, help="also write the results here")
  args = parser.parse_args(argv)
  sizes = [int(k) for k in args.groups.split(",")]
  devices = jax.devices()[:args.devices]
  if len(devices) < args.devices or args.batch % args.devices:
    parser.error(f"need {args.devices} devices dividing the batch; have {len(jax.devices())}")
  mesh = sharding.make_mesh(devices)
  config = make_config(args)
  cases, rois = random_inputs.random_cases(args.cases, args.roi)
  cache = roi_store.RoiCache(rois.__getitem__, 1 << 40)

  def pipeline(seed: int, workers: int | None = None):
    return input_pipeline.PatchInput(cases, None, patch_size=args.patch, patches_per_epoch=1000,
                                     global_batch_size=args.batch, seed=seed, mesh=mesh,
                                     cache=cache, prefetch=2, workers=workers)

  for c in cases:  # Decoded once, outside the timing.
    cache.get(c.case_id)
  batches = [b for _, b in zip(range(max(sizes)), pipeline(0).batches(0))]
  model = retinanet.build_model(retinanet.RetinaNetConfig.from_config(config))
  tx = optim.from_config(config, 100_000)
  graphdef, state = steps.init_train_state(model, tx)
  state = sharding.replicate(state, mesh)
  kind = devices[0].device_kind
  print(f"device: {kind} x {len(devices)}; patch {args.patch}, batch {args.batch} per run, "
        f"{args.dtype}, {args.backbone}")

  single = steps.make_batch_train_step(graphdef, tx, config, NORM, mesh)
  holder = [jax.tree.map(jnp.copy, state)]
  key = jax.random.key(0)

  def one():
    holder[0], metrics = single(holder[0], batches[0], key)
    return metrics

  if args.steps:
    time_calls(one, args.warmup, 0)
  results = {"device_kind": kind, "devices": len(devices), "patch": args.patch,
             "batch": args.batch, "dtype": args.dtype, "backbone": args.backbone, "groups": {}}
  for k in sizes:
    try:
      results["groups"][k] = _time_group(args, k, graphdef, tx, config, state, batches, mesh,
                                         one, pipeline)
      if str(k) in args.unmapped.split(","):
        results.setdefault("unmapped", {})[k] = _time_group(
            args, k, graphdef, tx, config, state, batches, mesh, one, pipeline, mapped=False)
    except Exception as e:  # pylint: disable=broad-except
      if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
        raise
      print(f"group of {k:2d}: out of device memory")  # The other sizes still run.
      results["groups"].setdefault(k, {"error": "out of device memory"})
  if args.json:
    atomic.write_json(args.json, results)
  return results


if __name__ == "__main__":
  main()
