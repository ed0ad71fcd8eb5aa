"""Tests for the stain maths and the stain switches of the augmentation."""

import colorsys
import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from midog_jax import domains
from midog_jax import sharding
from midog_jax.data import augment
from midog_jax.data import crops
from midog_jax.data import normalization
from midog_jax.data import roi_store
from midog_jax.data import sampling
from midog_jax.data import stain
from midog_jax.data import synthetic

P = 64
C = augment.crop_size(P)
# Ruifrok & Johnston's published OD vectors, written out here as the oracle.
H_OD = np.array([0.65, 0.70, 0.29]) / np.linalg.norm([0.65, 0.70, 0.29])
E_OD = np.array([0.07, 0.99, 0.11]) / np.linalg.norm([0.07, 0.99, 0.11])


def _angle(a, b) -> float:
  a, b = np.asarray(a, float), np.asarray(b, float)
  return float(np.degrees(np.arccos(np.clip(a @ b / np.linalg.norm(a) / np.linalg.norm(b), -1, 1))))


def _render(domain_id: str, seed: int, width: int = 256, height: int = 224):
  """A synthetic ROI of `domain_id` and the stain vectors it was rendered with.

  The same seed gives the same tissue and nuclei in every domain of one
  tumour type: only the stains (scanner and lab) differ.
  """
  d = domains.domain(domain_id)
  rng = np.random.default_rng(seed)
  tissue = synthetic.tissue_field(width, height, rng)
  state = rng.bit_generator.state
  image = synthetic.render(tissue, d, d.um_per_px, [], rng)
  replay = np.random.default_rng()
  replay.bit_generator.state = state  # `render` draws its stains first.
  return image, synthetic.stain(d, replay)


def test_deconvolution_is_exact_and_zero_strength_is_identity():
  rng = np.random.default_rng(0)
  x = rng.uniform(0.0, 1.0, (32, 32, 3)).astype(np.float32)
  x[0, :4] = [[1, 1, 1], [0, 0, 0], [1, 0, 0], [0.5, 1, 0]]
  roundtrip = lambda v, xp: stain.hed_to_rgb(stain.rgb_to_hed(v, xp), xp)
  np.testing.assert_allclose(roundtrip(x, np), np.maximum(x, stain.EPS), atol=2e-6, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(jax.jit(lambda v: roundtrip(v, jnp))(x)),
                             np.maximum(x, stain.EPS), atol=2e-6, rtol=1e-5)
  # Known amounts of the published stains decompose into exactly those amounts.
  amounts = rng.uniform(0, 2, (100, 2))
  mixed = np.exp(-(amounts[:, :1] * H_OD + amounts[:, 1:] * E_OD)).astype(np.float32)
  hed = stain.rgb_to_hed(mixed, np)
  np.testing.assert_allclose(hed[:, :2], amounts, atol=1e-4)
  np.testing.assert_allclose(hed[:, 2], 0.0, atol=1e-4)
  # Zero strength: the identity; a strength moves the stains within its bounds.
  key = jax.random.key(1)
  np.testing.assert_array_equal(np.asarray(stain.hed_jitter(key, jnp.asarray(x), 0.0)), x)
  for name, sigma in (("hed_light", 0.05), ("hed_strong", 0.2)):
    out = np.asarray(jax.jit(augment.COLOUR_AUGMENTATIONS[name])(key, mixed))
    moved = stain.rgb_to_hed(out, np)[:, :2]
    a = amounts * (1 - sigma) - sigma - 1e-3
    b = amounts * (1 + sigma) + sigma + 1e-3
    clipped = (out >= 1.0 - 1e-6).any(-1)  # Lighter than glass: clipped to white.
    assert ((moved >= a) & (moved <= b)).all(-1)[~clipped].all()
    assert not np.allclose(out, mixed, atol=1e-3)


def test_colour_spaces_invert_and_match_references():
  rng = np.random.default_rng(1)
  x = rng.uniform(0, 1, (500, 3)).astype(np.float32)
  both = jax.jit(lambda v: (stain.lab_to_rgb(stain.rgb_to_lab(v)), stain.rgb_to_hsv(v),
                            stain.hsv_to_rgb(stain.rgb_to_hsv(v))))
  lab_back, hsv, hsv_back = both(x)
  for got in (lab_back, stain.lab_to_rgb(stain.rgb_to_lab(x, np), np)):
    np.testing.assert_allclose(np.asarray(got), x, atol=2e-4)
  for got in (hsv_back, stain.hsv_to_rgb(stain.rgb_to_hsv(x, np), np)):
    np.testing.assert_allclose(np.asarray(got), x, atol=1e-5)
  want = np.array([colorsys.rgb_to_hsv(*map(float, p)) for p in x])
  np.testing.assert_allclose(np.asarray(hsv), want, atol=1e-5)
  # sRGB red and white in CIE L*a*b* (D65), as published.
  lab = stain.rgb_to_lab(np.array([[1, 0, 0], [1, 1, 1]], np.float32), np)
  np.testing.assert_allclose(lab, [[53.24, 80.09, 67.20], [100, 0, 0]], atol=0.02)


def test_macenko_recovers_the_synthetic_stains():
  """The generator mixes Ruifrok's vectors shifted per scanner and lab.

  Its nuclei always lie on eosin, so no pixel is pure haematoxylin: Macenko's
  extreme angle then finds a haematoxylin-rich mixture, biased towards
  eosin. The plane and the eosin vector are recovered closely.
  """
  for domain_id, seed in (("1a", 0), ("1b", 0), ("1c", 1), ("4", 2), ("6a", 3)):
    image, (h, e) = _render(domain_id, seed)
    found = stain.case_statistics(image)["macenko"]
    h_found, e_found = np.asarray(found["stains"])
    normal = np.cross(h, e) / np.linalg.norm(np.cross(h, e))
    assert abs(h_found @ normal) < np.sin(np.radians(1.0)), domain_id  # In the true plane.
    assert abs(e_found @ normal) < np.sin(np.radians(1.0)), domain_id
    assert _angle(e_found, e) < 5.0, domain_id
    assert _angle(h_found, h) < 20.0, domain_id
    assert _angle(h_found, e) < _angle(h, e), domain_id  # Biased towards eosin, not away.
    assert np.all(np.asarray(found["max_conc"]) > 0.1)
  # Glass only: no estimate, and the case is left as it is.
  blank = np.full((100, 100, 3), 245, np.uint8)
  assert stain.case_statistics(blank)["macenko"] is None
  np.testing.assert_array_equal(stain.macenko_params(None, found), stain.IDENTITY)


def _spread(images, mask) -> tuple[float, float]:
  """How far apart images of one tissue are: the std across images of the
  mean tissue colour (mean over channels), and the mean absolute difference
  of their pixels (over pairs)."""
  means = np.std([im[mask].mean(0) for im in images], axis=0).mean()
  pairs = [np.abs(a.astype(float) - b).mean() for i, a in enumerate(images) for b in images[:i]]
  return float(means), float(np.mean(pairs))


def test_normalising_three_scanners_brings_their_colours_together():
  images = [_render(d, seed=5)[0] for d in ("1a", "1b", "1c")]  # One tissue, three scanners.
  mask = normalization.tissue_mask(images[0])
  stats = [stain.case_statistics(im) for im in images]
  run = stain.RunStain.fit("macenko", "none", stats)
  (mean_before, pixels_before), (mean_after, pixels_after) = (
      _spread(images, mask), _spread([run.normalize(im) for im in images], mask))
  assert mean_before > 2.0 and mean_after < 0.5 * mean_before, (mean_before, mean_after)
  assert pixels_after < 0.7 * pixels_before, (pixels_before, pixels_after)
  # The host path (whole images) and the device path (one crop) agree.
  params = run.case_params(stats[0])
  x = images[0][:P, :P] / np.float32(255)
  device = np.asarray(jax.jit(stain.apply, static_argnames="method")(
      jnp.asarray(x), jnp.asarray(params), method="macenko"))
  np.testing.assert_allclose(run.normalize(images[0])[:P, :P] / 255, device, atol=0.5 / 255 + 1e-6)
  # A target equal to the case's own estimate changes nothing but rounding.
  own = stain.macenko_params(stats[0]["macenko"], stats[0]["macenko"])
  same = stain.normalize_image(images[0], own, "macenko")
  assert np.abs(same.astype(int) - images[0]).max() <= 3


def test_reinhard_and_randstainna_zero_strength_are_identities():
  image, _ = _render("2", seed=6, width=96, height=96)
  x = image / np.float32(255)
  mask = normalization.tissue_mask(image)
  draw = jax.jit(stain.randstainna, static_argnames="space")
  for space in ("lab", "hsv"):
    mean, std = stain.masked_stats(stain._TO_SPACE[space](x, np), mask, np)
    own = np.stack([mean, np.zeros(3), std, np.zeros(3)])  # A template of no spread.
    np.testing.assert_allclose(np.asarray(draw(jax.random.key(0), x, own, space, 1.0)), x,
                               atol=2e-3)
    # A spread moves the image; sigma 0 draws the mean template every time.
    wide = own.copy()
    wide[1] = 5.0 if space == "lab" else 0.05
    assert np.abs(np.asarray(draw(jax.random.key(0), x, wide, space, 1.0)) - x).max() > 0.01
    np.testing.assert_allclose(np.asarray(draw(jax.random.key(0), x, wide, space, 0.0)), x,
                               atol=2e-3)
  stats = stain.case_statistics(image)
  params = stain.reinhard_params(stats["lab"], stats["lab"])
  np.testing.assert_allclose(stain.apply(x, params, "reinhard", np), x, atol=2e-3)


def _batch(seed: int = 0, b: int = 8):
  rng = np.random.default_rng(seed)
  image, _ = _render("1b", seed, width=C + 40, height=C + 40)
  crops_ = np.stack([image[i * 5:i * 5 + C, i * 5:i * 5 + C] for i in range(b)])
  centers = rng.uniform(30, C - 30, (b, 3, 2)).astype(np.float32)
  run = stain.RunStain.fit("macenko", "lab", [stain.case_statistics(image)])
  params = np.stack([run.case_params(stain.case_statistics(image))] * b)
  params[1::2, :3] *= 1.1  # Images of other cases: other params.
  return crops_, centers, np.ones((b, 3), bool), params, np.asarray(run.distribution, np.float32)


def test_switches_are_deterministic_per_key_and_the_same_on_eight_devices():
  crops_, centers, valid, params, dist = _batch()
  config = augment.AugmentConfig(colour=("hed_strong",), randstainna="lab",
                                 stain_normalization="macenko")
  run = lambda key, cfg, *arrays: augment.augment_batch(
      key, *arrays[:3], patch_size=P, mean=(0.5,) * 3, std=(0.25,) * 3, config=cfg,
      stain=arrays[3] if cfg.stain_normalization != "none" else None,
      randstainna_stats=dist if cfg.randstainna != "none" else None)
  arrays = (crops_, centers, valid, params)
  a = run(jax.random.key(3), config, *arrays)
  again = run(jax.random.key(3), config, *arrays)
  other = run(jax.random.key(4), config, *arrays)
  for x, y in zip(a, again):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert not np.allclose(np.asarray(a[0]), np.asarray(other[0]))
  # The batch split over eight devices: the same draws, hence the same images, up
  # to the last bit (XLA compiles the per-device program with other roundings).
  mesh = sharding.make_mesh(jax.devices()[:8])
  spread = NamedSharding(mesh, PartitionSpec("data"))
  b = run(jax.random.key(3), config, *[jax.device_put(v, spread) for v in arrays])
  assert len(b[0].sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(b[0]), np.asarray(a[0]), rtol=0, atol=3e-5)
  np.testing.assert_allclose(np.asarray(b[1]), np.asarray(a[1]), rtol=0, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(b[2]), np.asarray(a[2]))
  # Validation: the stain normalisation alone, no random switch.
  off = dataclasses.replace(config, enabled=False)
  v1 = run(jax.random.key(3), off, *arrays)
  v2 = run(jax.random.key(9), off, *arrays)
  np.testing.assert_array_equal(np.asarray(v1[0]), np.asarray(v2[0]))
  m = (C - P) // 2
  want = [stain.apply(c[m:m + P, m:m + P] / np.float32(255), p, "macenko", np)
          for c, p in zip(crops_, params)]
  np.testing.assert_allclose(np.asarray(v1[0]) * 0.25 + 0.5, np.stack(want), atol=1e-5)


def test_config_names_and_host_batches_carry_params(tmp_path):
  config = ml_collections.ConfigDict({"stain_normalization": "macenko", "augment": dict(
      enabled=True, max_warp=0.2, max_rotate=10.0, max_zoom=2.0, p_affine=0.5,
      brightness=(0.25, 0.75), contrast=(0.5, 2.0), p_lighting=0.5, colour=("hed_light",),
      randstainna="hsv", randstainna_sigma=0.5)})
  got = augment.AugmentConfig.from_config(config)
  assert (got.stain_normalization, got.randstainna, got.randstainna_sigma, got.colour) == (
      "macenko", "hsv", 0.5, ("hed_light",))
  for field, value, message in (("stain_normalization", "vahadane", "stain_normalization 'vahadane'"),
                                ("augment.randstainna", "rgb", "augment.randstainna 'rgb'"),
                                ("augment.randstainna_sigma", -1.0, "randstainna_sigma -1.0")):
    bad = ml_collections.ConfigDict(config.to_dict())
    node, *path = field.split(".")[::-1]
    (bad.augment if path else bad)[node] = value
    with pytest.raises(ValueError, match=message):
      augment.AugmentConfig.from_config(bad)
  # Host batches: each patch carries its own case's params.
  rng = np.random.default_rng(0)
  cases = [sampling.SampledCase(i, 200, 180, np.zeros((0, 2), np.float32), np.zeros(0, np.int64))
           for i in (3, 7)]
  images = {c.case_id: rng.integers(0, 256, (180, 200, 3), dtype=np.uint8) for c in cases}
  plan = sampling.epoch_plan(cases, 6, P, seed=0, epoch=0, guided_fraction=0.0)
  params = {3: np.full((4, 3), 3.0, np.float32), 7: np.full((4, 3), 7.0, np.float32)}
  cache = roi_store.RoiCache(images.__getitem__, 1 << 20)
  out = crops.fill(plan, cache, C, 2, stain=params)
  np.testing.assert_array_equal(out["stain"][:, 0, 0], out["case_id"].astype(np.float32))
  assert "stain" not in crops.fill(plan, cache, C, 2)


def test_stain_store_keeps_statistics_and_run_stain_round_trips(tmp_path):
  class Case:  # The fields a store names a case by.
    file_name, width, height = "001.tiff", 64, 48
    record = type("Location", (), {"shard": "midogpp-train.tfrecord-00000", "offset": 12})
  image, _ = _render("1c", seed=7, width=64, height=48)
  calls = []
  load = lambda: calls.append(1) or image
  store = roi_store.StainStore(tmp_path)
  first = store.get(Case, load)
  assert roi_store.StainStore(tmp_path).get(Case, load) == first and len(calls) == 1
  # Another version's file is computed again.
  path = store.path(Case)
  assert os.path.basename(path) == "001.tiff.midogpp-train.tfrecord-00000.12.64x48.stain.json"
  with open(path, "w", encoding="utf-8") as f:
    f.write('{"version": 0}')
  assert roi_store.StainStore(tmp_path).get(Case, load) == first and len(calls) == 2
  # A folder that cannot be written: kept in memory.
  read_only = roi_store.StainStore("/proc/no-such-folder")
  assert read_only.get(Case, load) == first and read_only.get(Case, load) == first
  for method, space in (("macenko", "lab"), ("reinhard", "none"), ("none", "hsv")):
    run = stain.RunStain.fit(method, space, [first, first])
    assert stain.RunStain.from_json(run.to_json()) == run
  with pytest.raises(ValueError, match="no stained tissue"):
    stain.RunStain.fit("macenko", "none", [{**first, "macenko": None}])
