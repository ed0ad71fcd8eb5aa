"""midog-jax against its PyTorch peer: train step and forward pass, one process.

    python benchmarks/compare.py --device cuda --patch 512 --batch 12 --dtype bfloat16

Both run on the same card, with the same batch of random images and 50 x 50
px boxes (`model_step.fake_batch`) already on the device: the PyTorch peer
eagerly (`torch_peer.py`: bf16 autocast, channels-last), midog-jax as its
jitted `steps.make_train_step` / `retinanet.make_forward`. Each is warmed up
(compilation, cuDNN autotuning with `cudnn.benchmark`) before `--steps` timed calls that end with a
device synchronisation. Prints images per second for both and the ratio
midog-jax / PyTorch. Imports no TensorFlow.
"""

from __future__ import annotations

import argparse
import os
import time

# Both frameworks share the card: JAX must not reserve most of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402

import model_step  # noqa: E402  benchmarks/model_step.py, next to this file.
import torch_peer  # noqa: E402
from midog_jax import atomic  # noqa: E402
from midog_jax import sharding  # noqa: E402
from midog_jax.model import retinanet  # noqa: E402
from midog_jax.training import steps  # noqa: E402


def _time_torch(fn, sync, warmup: int, iters: int) -> float:
  for _ in range(warmup):
    fn()
  sync()
  start = time.perf_counter()
  for _ in range(iters):
    fn()
  sync()
  return (time.perf_counter() - start) / iters


def time_torch(args, batch) -> dict[str, float]:
  device = "cuda" if args.device == "cuda" else "cpu"
  torch.backends.cudnn.benchmark = True  # Autotuned convolutions: the peer at its best.
  peer = torch_peer.Peer(device, bf16=args.dtype == "bfloat16", channels_last=True,
                         patch=args.patch, all_levels=args.torch_all_levels)
  images, gt, valid = peer.to_device(*batch)
  out = {}
  if args.mode in ("both", "train"):
    out["train"] = args.batch / _time_torch(
        lambda: peer.train_step(images, gt, valid), peer.synchronize, args.warmup, args.steps)
  if args.mode in ("both", "forward"):
    out["forward"] = args.batch / _time_torch(
        lambda: peer.forward(images), peer.synchronize, args.warmup, args.steps)
  del peer, images, gt, valid
  if device == "cuda":
    torch.cuda.empty_cache()  # Leave the card to JAX.
  return out


def time_jax(args, batch) -> dict[str, float]:
  platform = "gpu" if args.device == "cuda" else "cpu"
  mesh = sharding.make_mesh(jax.devices(platform)[:1])
  model = retinanet.build_model(retinanet.RetinaNetConfig(dtype=args.dtype))
  images, gt, valid = sharding.shard_batch(batch, mesh)
  out = {}
  if args.mode in ("both", "train"):
    tx = optax.adamw(1e-4, b1=0.9, b2=0.99, weight_decay=0.01)  # As the peer's AdamW.
    graphdef, state = steps.init_train_state(model, tx)
    holder = [sharding.replicate(state, mesh)]
    train_step = steps.make_train_step(graphdef, tx, mesh=mesh)

    def train():
      holder[0], metrics = train_step(holder[0], images, gt, valid)
      return metrics

    out["train"] = args.batch / model_step.time_calls(train, args.warmup, args.steps)
  if args.mode in ("both", "forward"):
    graphdef, params, stats = steps.split_model(model)
    params, stats = sharding.replicate((params, stats), mesh)
    forward = retinanet.make_forward(graphdef, mesh=mesh)
    out["forward"] = args.batch / model_step.time_calls(
        lambda: forward(params, stats, images), args.warmup, args.steps)
  return out


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
  parser.add_argument("--patch", type=int, default=512)
  parser.add_argument("--batch", type=int, default=12)
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--mode", choices=["both", "train", "forward"], default="both")
  parser.add_argument("--torch-all-levels", action="store_true",
                      help="the peer computes P3..P7 and drops the unused, as the original")
  parser.add_argument("--json", default=None, help="also write the results here")
  args = parser.parse_args(argv)

  if args.device == "cuda" and not torch.cuda.is_available():
    parser.error("--device cuda: PyTorch sees no CUDA device")
  batch = model_step.fake_batch(args.batch, args.patch, 16)
  name = (torch.cuda.get_device_name(0) if args.device == "cuda"
          else f"cpu ({os.cpu_count()} cores)")
  print(f"device: {name}; patch {args.patch}, batch {args.batch}, {args.dtype}; "
        f"torch {torch.__version__}, jax {jax.__version__}")
  rates = {"torch": time_torch(args, batch), "jax": time_jax(args, batch)}
  results = {"device": name, "patch": args.patch, "batch": args.batch, "dtype": args.dtype,
             "torch_all_levels": args.torch_all_levels, **rates, "ratio": {}}
  for what in rates["jax"]:
    t, j = rates["torch"][what], rates["jax"][what]
    results["ratio"][what] = j / t
    print(f"{what:8s} torch {t:10.1f} img/s   jax {j:10.1f} img/s   ratio jax/torch {j / t:.2f}")
  if args.json:
    atomic.write_json(args.json, results)
  return results


if __name__ == "__main__":
  main()
