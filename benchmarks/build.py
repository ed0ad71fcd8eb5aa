"""`tfds build midogpp` in one process and with N Beam worker processes.

Writes synthetic 7215 x 5412 ROIs in the real TIFF layout (once), builds
them with the `tfds build` command without Beam options (one process) and
with N worker processes of Beam's direct runner, checks that both builds
hold the same examples in the same order, and prints wall time and ROIs per
second for each.

  python benchmarks/build.py --workdir /tmp/midog_build --rois 8 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import machine  # benchmarks/machine.py, beside this script.

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _canonical(folder: pathlib.Path) -> dict:
  """{split: [sorted features]} in storage order across shards; field by
  field, since protocol buffers may serialise map fields in another order in
  another process. TFDS's own writer and its Beam writer cut shards at
  other places, so shard boundaries are not compared."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from midog_jax.data import records  # pylint: disable=g-import-not-at-top
  out = {}
  for shard in sorted(folder.glob("*.tfrecord-*")):
    split = shard.name.split(".tfrecord")[0]
    out.setdefault(split, []).extend(
        sorted((k, v.SerializeToString(deterministic=True))
               for k, v in tf.train.Example.FromString(raw).features.feature.items())
        for _, raw in records.scan(shard))
  return out


def build(manual: pathlib.Path, data: pathlib.Path, workers: int,
          mode: str = "multi_processing") -> float:
  shutil.rmtree(data, ignore_errors=True)
  argv = [str(pathlib.Path(sys.executable).parent / "tfds"), "build", "midogpp",
          "--imports", "tfds_midogpp", "--manual_dir", str(manual), "--data_dir", str(data)]
  if workers > 1:
    argv.append(f"--beam_pipeline_options=direct_num_workers={workers},"
                f"direct_running_mode={mode}")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
  t = time.perf_counter()
  proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT)
  if proc.returncode:
    raise SystemExit(f"tfds build failed:\n{proc.stderr[-3000:]}")
  return time.perf_counter() - t


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--rois", type=int, default=8, help="full-size ROIs (cases)")
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--mode", default="multi_processing",
                      choices=("multi_processing", "multi_threading"))
  parser.add_argument("--width", type=int, default=7215)
  parser.add_argument("--height", type=int, default=5412)
  args = parser.parse_args(argv)
  from midog_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  work = pathlib.Path(args.workdir).resolve()
  manual = work / "manual"
  if not (manual / "MIDOG++.json").exists():
    # One case per domain per round; keep the first --rois cases' images.
    per_domain = -(-args.rois // 10)
    synthetic.write_dataset(str(manual), per_domain, args.width, args.height, seed=0,
                            density_scale=1, progress=True)
    _keep_first(manual, args.rois)
  rows = []
  for workers in (1, args.workers):
    seconds = build(manual, work / f"tfds_{workers}", workers, args.mode)
    rows.append({"workers": workers, "mode": args.mode if workers > 1 else "one process",
                 "seconds": round(seconds, 1),
                 "rois_per_s": round(args.rois / seconds, 3)})
    print(json.dumps(rows[-1]), flush=True)
  one, many = (_canonical(work / f"tfds_{w}" / "midogpp" / "full" / "1.1.0")
               for w in (1, args.workers))
  print(json.dumps({"same_examples_in_order": one == many, "speed_up": round(rows[0]["seconds"] /
                                                              rows[1]["seconds"], 2),
                    **machine.describe(),
                    "rois": args.rois,
                    "size": [args.width, args.height]}))
  if one != many:
    raise SystemExit("the builds differ")


def _keep_first(manual: pathlib.Path, n: int) -> None:
  """Drops the cases after the first n from the images and the annotations."""
  notes = json.loads((manual / "MIDOG++.json").read_text())
  keep = {im["id"] for im in sorted(notes["images"], key=lambda im: im["id"])[:n]}
  notes["images"] = [im for im in notes["images"] if im["id"] in keep]
  notes["annotations"] = [a for a in notes["annotations"] if a["image_id"] in keep]
  (manual / "MIDOG++.json").write_text(json.dumps(notes))
  lines = (manual / "datasets_xvalidation.csv").read_text().splitlines()
  (manual / "datasets_xvalidation.csv").write_text("\n".join(
      [lines[0]] + [l for l in lines[1:] if int(l.split(";")[0]) in keep]) + "\n")
  names = {im["file_name"] for im in notes["images"]}
  for p in (manual / "images").iterdir():
    if p.name not in names:
      p.unlink()


if __name__ == "__main__":
  main()
