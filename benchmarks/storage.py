"""Patches per second for a host that cannot keep the ROIs in RAM.

Times the training input (sampling, cropping with the augmentation margin,
object lookup; one thread by default, so per core) on full-size ROIs of a built
`midogpp`, with the ROIs
  - in RAM (decoded beforehand; the fast path when they fit),
  - streamed (no cache: each window of batches decodes its PNGs),
  - decoded once to disk and memory-mapped (`roi_store="disk"`), with the
    files in the page cache ("warm") and evicted from it before the epoch
    ("cold": every crop reads the disk),
and the one-time cost of writing the decoded files.

  python benchmarks/storage.py --data /tmp/midog_build/tfds_1 [--cases 8]
  (benchmarks/build.py makes such a dataset)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import machine  # benchmarks/machine.py, beside this script.

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from midog_jax.data import dataset  # noqa: E402
from midog_jax.data import input_pipeline
from midog_jax.data import roi_store


def _evict(folder: str) -> None:
  """Drops the files' pages from the page cache (no root needed)."""
  for name in os.listdir(folder):
    fd = os.open(os.path.join(folder, name), os.O_RDONLY)
    try:
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def _epoch(cases, cache, args) -> float:
  pipe = input_pipeline.PatchInput(
      cases, None, patch_size=args.patch, patches_per_epoch=args.patches,
      global_batch_size=args.batch, seed=0, cache=cache, prefetch=0, window=args.window,
      mesh=Mesh(np.array(jax.devices()[:1]), ("data",)), workers=args.workers,
      reuse_buffers=True)  # As on an accelerator host.
  t = time.perf_counter()
  n = sum(len(b["case_id"]) for b in pipe.host_batches(0, epochs=1))
  return n / (time.perf_counter() - t)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", required=True, help="a built midogpp (data_dir or its folder)")
  parser.add_argument("--cases", type=int, default=8)
  parser.add_argument("--patch", type=int, default=512)
  parser.add_argument("--batch", type=int, default=12)
  parser.add_argument("--patches", type=int, default=1200)
  parser.add_argument("--window", type=int, default=8, help="batches cropped per window")
  parser.add_argument("--workers", type=int, default=1, help="cropping threads")
  parser.add_argument("--decoded-dir", default=None, help="default: a temporary folder")
  args = parser.parse_args(argv)
  cases = dataset.read_cases(args.data, "train")[:args.cases]
  reader = dataset.RoiReader(args.data)
  by_id = {c.case_id: c for c in cases}
  out = {}

  ram = roi_store.RoiCache(lambda i: reader(by_id[i]), 1 << 40)
  t = time.perf_counter()
  for c in cases:
    ram.get(c.case_id)
  out["decode_s_per_roi"] = (time.perf_counter() - t) / len(cases)
  out["ram"] = _epoch(cases, ram, args)
  del ram
  out["streaming"] = _epoch(cases, roi_store.RoiCache(lambda i: reader(by_id[i]), 0), args)

  folder = args.decoded_dir or tempfile.mkdtemp(prefix="midog_decoded_")
  store = roi_store.DecodedStore(reader, folder)
  t = time.perf_counter()
  for c in cases:
    store(c)
  out["decode_to_disk_s_per_roi"] = (time.perf_counter() - t) / len(cases)

  def mapped():
    return roi_store.RoiCache(lambda i: store(by_id[i]), roi_store.decoded_bytes(cases))
  out["disk_warm"] = _epoch(cases, mapped(), args)
  _evict(folder)
  out["disk_cold"] = _epoch(cases, mapped(), args)
  for key in ("ram", "streaming", "disk_warm", "disk_cold"):
    print(f"{key:>10}: {out[key]:8,.0f} patches/s with {args.workers} cropping thread(s)")
  print(f"decode: {out['decode_s_per_roi']:.2f} s per ROI; decode and write to disk: "
        f"{out['decode_to_disk_s_per_roi']:.2f} s per ROI")
  out.update(**machine.describe(), cases=len(cases), workers=args.workers,
             size=[cases[0].width, cases[0].height], patch=args.patch)
  print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}))
  return out


if __name__ == "__main__":
  main()
