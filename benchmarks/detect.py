"""Sliding-window detection speed: windows per second and seconds per ROI.

    python benchmarks/detect.py --patch 512 --batch 64 --dtype bfloat16

Device: the jitted per-window function (normalise, network, decode, score
threshold, NMS) on random uint8 windows, after warm-up. Whole ROI: one
synthetic H&E image of --width x --height through `sliding_window.detect_image`,
with the host part (window cropping, mapping to image coordinates, distance
suppression) timed apart from the device calls. Also prints FLOPs per window
from XLA's cost analysis, model FLOP utilisation (see `flops.py`) and the
rate per device. Where `tifffile` (needed by `midog_jax.synthetic`) is
missing, the ROI is random noise instead: the untrained network's speed does
not depend on the content.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import flops as flops_lib  # benchmarks/flops.py, next to this file.
from midog_jax import atomic
from midog_jax import domains
from midog_jax import sharding
from midog_jax.data import normalization
from midog_jax.detection import sliding_window
from midog_jax.model import backbones
from midog_jax.model import retinanet as model_lib
from midog_jax.training import steps


def _roi(width: int, height: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
  try:
    from midog_jax.data import synthetic  # Needs tifffile.
  except ImportError:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "random noise"
  d = domains.DOMAINS[0]
  tissue = synthetic.tissue_field(width, height, rng)
  return synthetic.render(tissue, d, d.um_per_px, [], rng), "synthetic H&E"


def main(argv=None) -> dict[str, float]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--patch", type=int, default=512)
  parser.add_argument("--batch", type=int, default=64, help="windows per device call")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--backbone", default=backbones.DEFAULT, choices=sorted(backbones.BACKBONES),
                      help="the body (default the reference's)")
  parser.add_argument("--channels", type=int, default=model_lib.RetinaNetConfig.channels,
                      help="FPN and head width (default the reference's)")
  parser.add_argument("--width", type=int, default=7215)
  parser.add_argument("--height", type=int, default=5412)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--peak-tflops", type=float, default=None,
                      help="peak TFLOP/s per device for MFU (default: flops.py's table)")
  parser.add_argument("--json", default=None, help="also write the results here")
  args = parser.parse_args(argv)

  model = model_lib.build_model(model_lib.RetinaNetConfig(
      dtype=args.dtype, backbone=args.backbone, channels=args.channels))
  graphdef, params, batch_stats = steps.split_model(model)
  norm = normalization.Normalization((200.0, 150.0, 200.0), (40.0, 40.0, 30.0))
  mesh = sharding.make_mesh(jax.local_devices())
  detector = sliding_window.make_detector(graphdef, norm, args.patch, 100, 0.05, mesh=mesh)
  params, batch_stats = sharding.replicate((params, batch_stats), mesh)
  rng = np.random.default_rng(0)
  windows = sharding.shard_batch(
      rng.integers(0, 256, (args.batch, args.patch, args.patch, 3), dtype=np.uint8), mesh)
  threshold = jax.numpy.float32(0.05)
  jax.block_until_ready(detector.jitted(params, batch_stats, threshold, windows))
  start = time.perf_counter()
  for _ in range(args.steps):
    out = detector.jitted(params, batch_stats, threshold, windows)
  jax.block_until_ready(out)
  device_rate = args.steps * args.batch / (time.perf_counter() - start)

  image, kind = _roi(args.width, args.height, rng)
  n_windows = len(sliding_window.window_origins(args.width, args.height, args.patch))
  sliding_window.detect_image(image[:args.patch, :args.patch], detector, params, batch_stats,
                         args.patch, args.batch, progress=False)  # Warm-up at this batch.
  start = time.perf_counter()
  sliding_window.detect_image(image, detector, params, batch_stats, args.patch, args.batch,
                         progress=False)
  roi_seconds = time.perf_counter() - start
  device_seconds = n_windows / device_rate
  print(f"device: {device_rate:,.1f} windows/s ({args.patch} px, batch {args.batch}, "
        f"{args.dtype}, {mesh.size} device(s): {jax.devices()[0].device_kind})")
  print(f"roi: {roi_seconds:.2f} s per {args.width} x {args.height} ROI ({n_windows} windows, "
        f"{kind}): device about {device_seconds:.2f} s, host about "
        f"{max(roi_seconds - device_seconds, 0):.2f} s")
  devices = list(mesh.devices.flat)
  total = flops_lib.compiled_flops(detector.jitted, params, batch_stats, threshold, windows,
                                   n_devices=len(devices))
  results = {"device_kind": devices[0].device_kind, "devices": len(devices),
             "patch": args.patch, "batch": args.batch, "dtype": args.dtype,
             "windows_per_second": device_rate, "roi_seconds": roi_seconds,
             "roi_windows": n_windows}
  results["cost"] = flops_lib.report("detect", total and total / args.batch, device_rate,
                                     devices, args.dtype, args.peak_tflops, unit="window")
  if args.json:
    atomic.write_json(args.json, results)
  return results


if __name__ == "__main__":
  main()
