"""Writes a synthetic MIDOG++ in the real formats: TIFFs, `MIDOG++.json`, split CSV.

  python -m midog_jax.synthetic --out DIR --cases-per-domain N \\
      --width W --height H --seed S [--layout-from MIDOG++.json]

How the images are made: midog_jax/data/synthetic.py. Same seed, same bytes.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from midog_jax import commands
from midog_jax import console


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m midog_jax.synthetic",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True,
                      help="output folder (images/, MIDOG++.json, datasets_xvalidation.csv)")
  parser.add_argument("--cases-per-domain", type=int, default=5,
                      help="cases of each of the 10 domains, about 20%% of them test "
                           "(default 5)")
  parser.add_argument("--width", type=int, default=1024, help="image width in px (default 1024)")
  parser.add_argument("--height", type=int, default=768, help="image height in px (default 768)")
  parser.add_argument("--seed", type=int, default=0,
                      help="random seed; the same seed writes the same bytes (default 0)")
  parser.add_argument("--layout-from", default=None, metavar="MIDOG++.json",
                      help="real MIDOG++.json (with datasets_xvalidation.csv beside it): "
                           "place objects at the real coordinates, scaled to W x H")
  parser.add_argument("--density-scale", type=float, default=1.0,
                      help="objects per area relative to the real data (default 1)")
  parser.add_argument("--rgb", action="store_true",
                      help="write RGB instead of RGBA TIFFs (the real files are RGBA)")
  args = parser.parse_args(argv)
  if args.cases_per_domain < 1 or args.width < 64 or args.height < 64:
    parser.error("need --cases-per-domain >= 1 and images of at least 64 x 64 px")
  from midog_jax.data import annotations  # SciPy and the TIFF writer: after parsing.
  from midog_jax.data import synthetic
  try:
    cases = synthetic.write_dataset(args.out, args.cases_per_domain, args.width, args.height,
                                    args.seed, args.layout_from, args.density_scale,
                                    rgba=not args.rgb, progress=console.stderr_is_tty())
  except annotations.AnnotationError as e:
    print(f"error: --layout-from: {e}", file=sys.stderr)
    return 2
  n_obj = sum(len(c.objects) for c in cases)
  print(f"wrote {len(cases)} cases with {n_obj} objects to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(commands.guard(main))
