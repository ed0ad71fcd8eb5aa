"""What each stain switch costs, as a fraction of the train step, and what normalising does.

    python benchmarks/stain.py [--patch 128] [--batch 8] [--steps 10] [--json out.json]

On crops of a synthetic ROI (domain 1b), each jitted and timed after a
warm-up call:

* the train step: the reference's augmentation on the device, RetinaNet
  (ResNet18, from scratch) forward and backward, AdamW;
* the augmentation alone, plain and with each switch (`--switches`). A
  switch's cost is its augmentation's time minus the plain one's, as a
  fraction of the train step (XLA runs the augmentation before the network
  inside the same program). Each time is the best of three means over
  `--steps` calls.

Host side: a case's stain statistics (`stain.case_statistics`, once per case
and dataset) and a whole image's normalisation per megapixel (detection).
Last, how far apart one tissue rendered by the three breast-carcinoma
scanners (1a, 1b, 1c) is before and after each normalisation: the std across
scanners of the mean tissue colour (0-255), over `--spread-seeds` tissues.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import default
from midog_jax import atomic
from midog_jax import domains
from midog_jax import sharding
from midog_jax.data import augment
from midog_jax.data import normalization
from midog_jax.data import stain
from midog_jax.data import synthetic
from midog_jax.model import retinanet
from midog_jax.training import optim
from midog_jax.training import steps

# Switch name -> AugmentConfig fields (the names of configs/leave_one_domain_out.py).
SWITCHES = {
    "hed_light": {"colour": ("hed_light",)},
    "hed_strong": {"colour": ("hed_strong",)},
    "randstainna": {"randstainna": "lab"},
    "randstainna_hsv": {"randstainna": "hsv"},
    "macenko": {"stain_normalization": "macenko"},
    "reinhard": {"stain_normalization": "reinhard"},
}


_MAX_SAMPLE_NOTE = "a grid sample of at most 2^18 pixels, so about as long for a full ROI"


def render(domain_id: str, seed: int, width: int, height: int) -> np.ndarray:
  """One synthetic ROI of `domain_id`; one seed is one tissue in every domain of a type."""
  d = domains.domain(domain_id)
  rng = np.random.default_rng(seed)
  return synthetic.render(synthetic.tissue_field(width, height, rng), d, d.um_per_px, [], rng)


def seconds_per_call(fn, steps_: int, rounds: int = 3) -> float:
  """The best of `rounds` means over `steps_` calls, after a compiling call."""
  jax.block_until_ready(fn())
  best = float("inf")
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(steps_):
      out = fn()
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - start) / steps_)
  return best


def _seconds(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def batch_of(args, image: np.ndarray) -> dict[str, np.ndarray]:
  """Crops, objects and stain params as the input pipeline makes them."""
  c = augment.crop_size(args.patch)
  rng = np.random.default_rng(0)
  ys = rng.integers(0, image.shape[0] - c, args.batch)
  xs = rng.integers(0, image.shape[1] - c, args.batch)
  statistics = stain.case_statistics(image)
  return {"crops": np.stack([image[y:y + c, x:x + c] for y, x in zip(ys, xs)]),
          "centers": rng.uniform(c / 2 - 20, c / 2 + 20, (args.batch, 4, 2)).astype(np.float32),
          "labels": np.ones((args.batch, 4), np.int32), "valid": np.ones((args.batch, 4), bool),
          "statistics": statistics}


def time_switches(args, batch) -> dict[str, float]:
  """Seconds of the train step and of each augmentation (key "plain" and the switches)."""
  config = default.get_config()
  config.patch_size, config.batch_size, config.model.body_weights = args.patch, args.batch, "none"
  mesh = sharding.make_mesh(jax.devices()[:1])
  norm = normalization.Normalization((200.0,) * 3, (40.0,) * 3)
  out = {}
  if not args.no_train_step:
    model = retinanet.build_model(retinanet.RetinaNetConfig.from_config(config))
    tx = optim.from_config(config, 1000)
    graphdef, state = steps.init_train_state(model, tx)
    holder = [sharding.replicate(state, mesh)]
    step = steps.make_batch_train_step(graphdef, tx, config, norm, mesh)
    device_batch = sharding.shard_batch({k: batch[k] for k in ("crops", "centers", "labels",
                                                               "valid")}, mesh)

    def train():
      holder[0], metrics = step(holder[0], device_batch, jax.random.key(0))
      return metrics
    out["train_step"] = seconds_per_call(train, args.steps)
  statistics = batch["statistics"]
  for name in ("plain", *args.switches):
    fields = {} if name == "plain" else SWITCHES[name]
    cfg = augment.AugmentConfig(**fields)
    run = stain.RunStain.fit(cfg.stain_normalization, cfg.randstainna, [statistics])
    params = None if cfg.stain_normalization == "none" else jnp.asarray(
        np.stack([run.case_params(statistics)] * args.batch))
    dist = None if run.distribution is None else jnp.asarray(run.distribution, jnp.float32)
    arrays = [jnp.asarray(batch[k]) for k in ("crops", "centers", "valid")]
    out[name] = seconds_per_call(lambda: augment.augment_batch(
        jax.random.key(1), *arrays, patch_size=args.patch, mean=norm.unit_mean,
        std=norm.unit_std, config=cfg, stain=params, randstainna_stats=dist), args.steps)
  return out


def spread(seeds: int, width: int, height: int) -> dict[str, tuple[float, float]]:
  """{normalisation: (mean, max) over tissues of the across-scanner colour spread}."""
  found: dict[str, list[float]] = {"none": [], "macenko": [], "reinhard": []}
  for seed in range(seeds):
    images = [render(d, 100 + seed, width, height) for d in ("1a", "1b", "1c")]
    mask = normalization.tissue_mask(images[0])  # One tissue: one mask.
    statistics = [stain.case_statistics(im) for im in images]
    for method in found:
      out = images if method == "none" else [
          stain.RunStain.fit(method, "none", statistics).normalize(im) for im in images]
      found[method].append(float(np.std([im[mask].mean(0) for im in out], axis=0).mean()))
  return {k: (float(np.mean(v)), float(np.max(v))) for k, v in found.items()}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--patch", type=int, default=128, help="patch side P in pixels")
  parser.add_argument("--batch", type=int, default=8, help="patches per step")
  parser.add_argument("--steps", type=int, default=10, help="timed calls of each function")
  parser.add_argument("--switches", nargs="*", default=list(SWITCHES), choices=list(SWITCHES),
                      help="switches to time (default: all)")
  parser.add_argument("--no-train-step", action="store_true",
                      help="time the augmentations only (no fractions of the step)")
  parser.add_argument("--image", type=int, nargs=2, default=(1024, 768), metavar=("W", "H"),
                      help="synthetic ROI size for the crops and the host timings")
  parser.add_argument("--spread-seeds", type=int, default=4,
                      help="tissues for the across-scanner spread (0: skip it)")
  parser.add_argument("--json", default=None, help="also write the results here")
  args = parser.parse_args(argv)

  image = render("1b", 0, *args.image)
  batch = batch_of(args, image)
  print(f"device: {jax.devices()[0].device_kind}, patch {args.patch}, batch {args.batch}, "
        f"{args.steps} timed calls each")
  times = time_switches(args, batch)
  results = {"patch": args.patch, "batch": args.batch, "seconds": times, "fraction": {}}
  if "train_step" in times:
    print(f"train step: {times['train_step'] * 1e3:.1f} ms")
  print(f"augmentation, plain: {times['plain'] * 1e3:.2f} ms")
  for name in args.switches:
    extra = times[name] - times["plain"]
    line = f"{name}: {times[name] * 1e3:.2f} ms augmentation, {extra * 1e3:+.2f} ms"
    if "train_step" in times:
      results["fraction"][name] = extra / times["train_step"]
      line += f", {100 * extra / times['train_step']:+.1f} % of the train step"
    print(line)
  mpx = image.shape[0] * image.shape[1] / 1e6
  statistics = stain.case_statistics(image)  # Warm-up; then the best of three.
  results["statistics_s"] = min(_seconds(lambda: stain.case_statistics(image)) for _ in range(3))
  params = stain.RunStain.fit("macenko", "none", [statistics]).case_params(statistics)
  stain.normalize_image(image, params, "macenko")  # Compiles for this width.
  results["normalize_s_per_mpx"] = min(
      _seconds(lambda: stain.normalize_image(image, params, "macenko")) for _ in range(3)) / mpx
  print(f"host: a case's stain statistics {results['statistics_s'] * 1e3:.0f} ms "
        f"({image.shape[1]} x {image.shape[0]} px; {_MAX_SAMPLE_NOTE}), Macenko normalisation "
        f"of a whole image {results['normalize_s_per_mpx'] * 1e3:.0f} ms/Mpx")
  if args.spread_seeds:
    results["spread"] = spread(args.spread_seeds, 384, 320)
    for method, (mean, worst) in results["spread"].items():
      print(f"across-scanner spread of the tissue colour, {method}: {mean:.2f} "
            f"(worst of {args.spread_seeds} tissues {worst:.2f})")
  if args.json:
    atomic.write_json(args.json, results)
  return results


if __name__ == "__main__":
  main()
