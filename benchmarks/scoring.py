"""Seconds to score a test split: F1 at one threshold, AP, and the threshold sweep.

    python benchmarks/scoring.py --cases 111 --detections 10000

Synthetic cases of 7215 x 5412 px at 0.25 µm/px with `--gt` mitotic figures;
a third of them get a detection nearby, the rest of the detections are
spread uniformly. Each timing is the best of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from midog_jax.evaluation import metrics

WIDTH, HEIGHT, UM_PER_PX = 7215, 5412, 0.25


def make_cases(n: int, detections: int, gt: int, seed: int = 0) -> list[metrics.ScoredCase]:
  rng = np.random.default_rng(seed)
  cases = []
  for _ in range(n):
    g = rng.uniform(0, (WIDTH, HEIGHT), (gt, 2))
    hits = g[: gt // 3] + rng.normal(0, 10, (gt // 3, 2))
    rest = rng.uniform(0, (WIDTH, HEIGHT), (detections - len(hits), 2))
    cases.append(metrics.ScoredCase(g, np.concatenate([hits, rest]),
                                    rng.uniform(size=detections), UM_PER_PX))
  return cases


def _best(fn, repeats: int) -> float:
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--cases", type=int, default=111)
  p.add_argument("--detections", type=int, default=10_000)
  p.add_argument("--gt", type=int, default=60, help="mitotic figures per case")
  p.add_argument("--repeats", type=int, default=3)
  a = p.parse_args()
  cases = make_cases(a.cases, a.detections, a.gt)
  groups = [f"type{i % 7}" for i in range(len(cases))]
  print(f"{a.cases} cases x {a.detections} detections, {a.gt} ground-truth points each")
  timings = {
      "f1": lambda: metrics.all_case_counts(cases, 0.5),
      "ap": lambda: metrics.average_precision(cases),
      "score": lambda: metrics.summarize(cases, groups, 0.5),
      "sweep": lambda: metrics.choose_threshold(cases),
  }
  for name, fn in timings.items():
    print(f"{name}: {_best(fn, a.repeats):.3f} s")


if __name__ == "__main__":
  main()
