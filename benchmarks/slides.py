"""Whole-slide speed and memory: windows/s, read MP/s per thread, seconds and peak RSS per slide.

    python benchmarks/slides.py --sizes 20000x15000 40000x30000 --network untrained

For each size a synthetic Aperio SVS (JPEG, 40 % tissue, 0.25 µm/px) is
written, its level-0 reading is timed on one thread and on --workers threads
(random 512 px windows over tissue), then `python -m midog_jax.slides`'s
pipeline counts it in a child process of its own, whose peak resident memory
(ru_maxrss) is the slide's. The network: "untrained" (the reference's
RetinaNet at --patch with random weights: the speed of a trained one),
"none" (no detections: the host part alone) or a run's workdir. The time
for a 100,000 x 80,000 px slide is projected from the largest size (windows
grow with the tissue area, at the same 40 %).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

from midog_jax import atomic
from midog_jax.data import slide_reader
from midog_jax.data import synthetic_slides

# JAX and the model load in the child alone: the parent only writes and reads slides.

PROJECTED = (100_000, 80_000)


def _size(text: str) -> tuple[int, int]:
  w, _, h = text.lower().partition("x")
  return int(w), int(h)


def read_rates(path: str, patch: int, workers: int, n: int = 200) -> dict[str, float]:
  """Level-0 MP/s of random windows over tissue: one thread, and `workers` threads."""
  with slide_reader.open_slide(path) as slide:
    cell = slide_reader.mask_downsample(slide.um_per_px)
    mask = slide_reader.tissue_mask(slide.thumbnail(cell), cell * slide.um_per_px)
    ys, xs = np.nonzero(mask)
    rng = np.random.default_rng(0)
    pick = rng.integers(0, len(xs), 2 * n)  # Two sets: the second pass finds no cached tile.
    origins = [(int(x * cell), int(y * cell)) for x, y in zip(xs[pick], ys[pick])]
    start = time.perf_counter()
    for x, y in origins[:n]:
      slide.read(x, y, patch, patch)
    one = n * patch * patch / 1e6 / (time.perf_counter() - start)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      list(pool.map(lambda o: slide.read(o[0], o[1], patch, patch), origins[n:]))
    many = n * patch * patch / 1e6 / (time.perf_counter() - start)
  return {"read_mp_s_one_thread": one, "read_mp_s_all_threads": many,
          "read_mp_s_per_thread": many / workers}


def _min_overlap(patch: int) -> int:
  # The reference's 50 px at its 512 px; small test windows keep 10 % (as the tests do).
  return 50 if patch >= 512 else 0


def _untrained(patch: int, batch: int):
  """The reference's RetinaNet with random weights, as the pipeline's model."""
  # pylint: disable=g-import-not-at-top  # In the child only: seconds of JAX start-up.
  import jax
  from midog_jax import sharding
  from midog_jax.data import normalization
  from midog_jax.detection import slides
  from midog_jax.detection import sliding_window
  from midog_jax.model import retinanet
  from midog_jax.training import steps
  graphdef, params, batch_stats = steps.split_model(retinanet.build_model(
      retinanet.RetinaNetConfig()))
  norm = normalization.Normalization((200.0, 150.0, 200.0), (40.0, 40.0, 30.0))
  mesh = sharding.make_mesh(jax.local_devices())
  batch = max(1, batch // mesh.size) * mesh.size
  det = sliding_window.make_detector(graphdef, norm, patch, 100, 0.5, mesh=mesh)
  weights = sharding.replicate((params, batch_stats), mesh)
  return slides.Model(lambda w, o: det(*weights, w), patch, batch, _min_overlap(patch), 0.5,
                      (0.23, 0.25), "untrained")


def child(args: argparse.Namespace) -> dict:
  """Counts one slide in this process; its peak RSS is the slide's."""
  # pylint: disable=g-import-not-at-top  # In the child only: seconds of JAX start-up.
  import jax
  from midog_jax.detection import detector
  from midog_jax.detection import slides
  if args.network == "none":
    empty = lambda w, o: (np.zeros((len(w), 1, 2)), np.zeros((len(w), 1)),  # noqa: E731
                          np.zeros((len(w), 1), bool))
    model = slides.Model(empty, args.patch, args.batch, _min_overlap(args.patch), 0.5,
                         (0.23, 0.25), "none")
  elif args.network == "untrained":
    model = _untrained(args.patch, args.batch)
  else:
    model = slides.model_from_runs([detector.load_run(args.network)], 0.5, args.batch)
  settings = slides.Settings(0.5, "benchmark", workers=args.workers)
  warm = np.full((model.batch_size, args.patch, args.patch, 3), 255, np.uint8)
  jax.block_until_ready(model.fn(warm, np.zeros((model.batch_size, 2))))  # Compiled first.
  start = time.perf_counter()
  report = slides.process_slide(args.child, model, settings, args.out, progress=False)
  seconds = time.perf_counter() - start
  return {"windows": report["windows"], "seconds": seconds,
          "windows_per_second": report["windows"] / seconds,
          "tissue_mm2": report["tissue"]["mm2"], "figures": report["figures"],
          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", nargs="+", type=_size, default=[(20000, 15000), (40000, 30000)],
                      help="slide sizes WxH in px (default 20000x15000 40000x30000)")
  parser.add_argument("--network", default="untrained",
                      help='"untrained" (default), "none" or a training run\'s workdir')
  parser.add_argument("--patch", type=int, default=512, help="window size (default 512)")
  parser.add_argument("--batch", type=int, default=8, help="windows per device call")
  parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                      help="reader threads (default: the cores, at most 8)")
  parser.add_argument("--dir", default=None, help="where slides and outputs go (default: temp)")
  parser.add_argument("--json", default=None, help="also write the results here")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(child(args)))
    return {}
  root = args.dir or tempfile.mkdtemp(prefix="slides-benchmark-")
  results = {"network": args.network, "patch": args.patch, "batch": args.batch,
             "workers": args.workers, "sizes": []}
  for w, h in args.sizes:
    path = os.path.join(root, f"slide_{w}x{h}.svs")
    start = time.perf_counter()
    if not os.path.exists(path):
      synthetic_slides.write_slide(path, synthetic_slides.SlideSpec(w, h, tile=512, seed=1),
                                   "svs", compression="jpeg")
    row = {"width": w, "height": h, "write_seconds": time.perf_counter() - start,
           "file_mb": os.path.getsize(path) / 2 ** 20}
    row.update(read_rates(path, args.patch, args.workers))
    proc = subprocess.run(
        [sys.executable, __file__, "--child", path, "--out", os.path.join(root, f"out_{w}x{h}"),
         "--network", args.network, "--patch", str(args.patch), "--batch", str(args.batch),
         "--workers", str(args.workers)], capture_output=True, text=True, check=False)
    if proc.returncode:
      sys.exit(f"the pipeline failed on {path}:\n{proc.stderr[-3000:]}")
    row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    results["sizes"].append(row)
    print(f"slide {w} x {h}: {row['windows']} windows in {row['seconds']:.1f} s "
          f"({row['windows_per_second']:.2f} windows/s), peak RSS {row['peak_rss_mb']:.0f} MB, "
          f"read {row['read_mp_s_one_thread']:.1f} MP/s on one thread, "
          f"{row['read_mp_s_per_thread']:.1f} MP/s per thread on {args.workers}; "
          f"written in {row['write_seconds']:.0f} s ({row['file_mb']:.0f} MB)", flush=True)
  big = max(results["sizes"], key=lambda r: r["width"] * r["height"])
  factor = PROJECTED[0] * PROJECTED[1] / (big["width"] * big["height"])
  results["projected_100000x80000_seconds"] = big["seconds"] * factor
  print(f"projected: {big['seconds'] * factor / 60:.1f} min for a {PROJECTED[0]} x {PROJECTED[1]} "
        f"px slide ({big['windows'] * factor:.0f} windows at {big['windows_per_second']:.2f} "
        "windows/s)")
  if args.json:
    atomic.write_json(args.json, results)
  return results


if __name__ == "__main__":
  main()
