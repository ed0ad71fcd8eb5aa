"""Sliding-window detection speed: windows per second and seconds per ROI.

    python benchmarks/detect.py --patch 512 --batch 64 --dtype bfloat16

Device: the jitted per-window function (normalise, network, decode, score
threshold, NMS) on random uint8 windows, after warm-up. Whole ROI: one
synthetic H&E image of --width x --height through `inference.detect_image`,
with the host part (window cropping, mapping to image coordinates, distance
suppression) timed apart from the device calls.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from midog_jax import domains, inference, normalization, steps, synthetic
from midog_jax import model as model_lib


def main(argv=None) -> dict[str, float]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--patch", type=int, default=512)
  parser.add_argument("--batch", type=int, default=64, help="windows per device call")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--width", type=int, default=7215)
  parser.add_argument("--height", type=int, default=5412)
  parser.add_argument("--steps", type=int, default=10)
  args = parser.parse_args(argv)

  model = model_lib.build_model(model_lib.RetinaNetConfig(dtype=args.dtype))
  graphdef, params, batch_stats = steps.split_model(model)
  norm = normalization.Normalization((200.0, 150.0, 200.0), (40.0, 40.0, 30.0))
  mesh = steps.make_mesh(jax.local_devices())
  detector = inference.make_detector(graphdef, norm, args.patch, 100, 0.05, mesh=mesh)
  params, batch_stats = steps.replicate((params, batch_stats), mesh)
  rng = np.random.default_rng(0)
  windows = steps.shard_batch(
      rng.integers(0, 256, (args.batch, args.patch, args.patch, 3), dtype=np.uint8), mesh)
  threshold = jax.numpy.float32(0.05)
  jax.block_until_ready(detector.jitted(params, batch_stats, threshold, windows))
  start = time.perf_counter()
  for _ in range(args.steps):
    out = detector.jitted(params, batch_stats, threshold, windows)
  jax.block_until_ready(out)
  device_rate = args.steps * args.batch / (time.perf_counter() - start)

  d = domains.DOMAINS[0]
  tissue = synthetic.tissue_field(args.width, args.height, rng)
  image = synthetic.render(tissue, d, d.um_per_px, [], rng)
  n_windows = len(inference.window_origins(args.width, args.height, args.patch))
  inference.detect_image(image[:args.patch, :args.patch], detector, params, batch_stats,
                         args.patch, args.batch, progress=False)  # Warm-up at this batch.
  start = time.perf_counter()
  inference.detect_image(image, detector, params, batch_stats, args.patch, args.batch,
                         progress=False)
  roi_seconds = time.perf_counter() - start
  device_seconds = n_windows / device_rate
  print(f"device: {device_rate:,.1f} windows/s ({args.patch} px, batch {args.batch}, "
        f"{args.dtype}, {mesh.size} device(s): {jax.devices()[0].device_kind})")
  print(f"roi: {roi_seconds:.2f} s per {args.width} x {args.height} ROI ({n_windows} windows): "
        f"device about {device_seconds:.2f} s, host about {max(roi_seconds - device_seconds, 0):.2f} s")
  return {"windows_per_second": device_rate, "roi_seconds": roi_seconds}


if __name__ == "__main__":
  main()
