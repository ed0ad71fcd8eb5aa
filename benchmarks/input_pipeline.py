"""Host input pipeline speed: patches per second, cached and streaming.

Writes synthetic full-size ROIs (7215 x 5412 by default), builds `midogpp`
from them, and times the host side of the pipeline (sampling, cropping with
the augmentation margin, object lookup) on one thread, so the figure is per
core. Cached: ROIs decoded once and kept in RAM. Streaming: no cache, every
ROI decoded from the TFDS record when a window of batches needs it.

  python benchmarks/input_pipeline.py [--cases 4] [--width 7215 --height 5412]
"""

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from midog_jax import dataset, input_pipeline, synthetic  # noqa: E402
from tfds_midogpp.midogpp import midogpp_dataset_builder as builder_lib  # noqa: E402


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", type=int, default=4, help="ROIs per domain is 1; this many are used")
  parser.add_argument("--width", type=int, default=7215)
  parser.add_argument("--height", type=int, default=5412)
  parser.add_argument("--patch", type=int, default=512)
  parser.add_argument("--batch", type=int, default=12)
  parser.add_argument("--patches", type=int, default=480, help="patches per timed epoch")
  parser.add_argument("--workdir", default=None, help="reuse a folder (keeps the built data)")
  args = parser.parse_args(argv)

  work = args.workdir or tempfile.mkdtemp(prefix="midog_input_bench_")
  manual, data = os.path.join(work, "manual"), os.path.join(work, "tfds")
  if not os.path.exists(os.path.join(manual, "MIDOG++.json")):
    t = time.perf_counter()
    synthetic.write_dataset(manual, 1, args.width, args.height, seed=0, density_scale=1)
    print(f"wrote 10 synthetic ROIs in {time.perf_counter() - t:.1f} s")
  builder = builder_lib.Builder(data_dir=data)
  if not builder.is_prepared():
    t = time.perf_counter()
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
    print(f"built midogpp in {time.perf_counter() - t:.1f} s")
  cases = dataset.read_cases(data, "train")[:args.cases]
  reader = dataset.RoiReader(data)
  by_id = {c.case_id: c for c in cases}

  def load(case_id):
    return reader(by_id[case_id])

  results = {}
  modes = (("cached", 1 << 40, 1, False), ("cached, reused buffers", 1 << 40, 1, True),
           ("streaming", 0, 1 << 20, False))
  for mode, cache_bytes, window, reuse in modes:
    pipe = input_pipeline.PatchInput(
        cases, load, patch_size=args.patch, patches_per_epoch=args.patches,
        global_batch_size=args.batch, seed=0, cache_bytes=cache_bytes, prefetch=0,
        window=window, mesh=Mesh(np.array(jax.devices()[:1]), ("data",)),
        reuse_buffers=reuse)
    if cache_bytes:
      for c in cases:  # Decode once, outside the timing.
        pipe.cache.get(c.case_id)
    t = time.perf_counter()
    n = sum(len(b["case_id"]) for b in pipe.host_batches(0, epochs=1))
    dt = time.perf_counter() - t
    results[mode] = n / dt
    print(f"{mode}: {n} patches of {pipe.crop_size} px from {len(cases)} ROIs of "
          f"{args.width} x {args.height} in {dt:.2f} s: {n / dt:,.0f} patches/s on one core")
  return results


if __name__ == "__main__":
  main()
  sys.exit(0)
