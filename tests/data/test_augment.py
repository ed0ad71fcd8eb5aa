"""Tests for the on-device augmentation."""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from midog_jax.data import augment

P = 64
C = augment.crop_size(P)
M = augment.margin(P)
ZERO = (0.0, 0.0, 0.0)
ONE = (1.0, 1.0, 1.0)
OFF = augment.AugmentConfig(p_affine=0.0, p_lighting=0.0)


@functools.partial(jax.jit, static_argnames="box_size")
def _augment_one(crop, centers, valid, params, mean, std, box_size):
  return augment.augment_image(crop, centers, valid, params, patch_size=P,
                               mean=mean, std=std, box_size=box_size)


def _apply(crop, centers, valid, params, box_size=50.0, mean=ZERO, std=ONE):
  out = _augment_one(jnp.asarray(crop), jnp.asarray(centers, jnp.float32),
                     jnp.asarray(valid), params, jnp.asarray(mean),
                     jnp.asarray(std), box_size=box_size)
  return tuple(np.asarray(x) for x in out)


def _params(**kw):
  p = augment.identity_params()
  return p._replace(**{k: jnp.asarray(v, getattr(p, k).dtype)
                       for k, v in kw.items()})


def _dot(center, radius=3.0):
  yy, xx = np.mgrid[0:C, 0:C] + 0.5
  d2 = (xx - center[0]) ** 2 + (yy - center[1]) ** 2
  img = np.where(d2 <= radius ** 2, 255, 0).astype(np.uint8)
  return np.repeat(img[..., None], 3, -1)


def test_crop_size_reference_window():
  assert augment.crop_size(512) == 724
  for p in (64, 100, 512, 1024):
    assert augment.crop_size(p) >= p * math.sqrt(2) - 1
    assert (augment.crop_size(p) - p) % 2 == 0


def test_dot_stays_under_transformed_centre():
  rng = np.random.default_rng(0)
  cfg = augment.AugmentConfig(p_affine=1.0, p_lighting=0.5)
  checked = 0
  for i in range(40):
    center = rng.uniform(C / 2 - 20, C / 2 + 20, size=2)
    params = augment.sample_params(jax.random.key(i), cfg)
    img, boxes, keep = _apply(_dot(center), center[None], [True], params,
                              box_size=12.0)
    x1, y1, x2, y2 = boxes[0]
    if not keep[0] or min(x1, y1) <= 0 or max(x2, y2) >= P:
      continue  # Clipped or dropped; the centre is not the box centre.
    w = img[..., 0]
    yy, xx = np.mgrid[0:P, 0:P] + 0.5
    cx, cy = (w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()
    assert abs(cx - (x1 + x2) / 2) < 1.0 and abs(cy - (y1 + y2) / 2) < 1.0
    # The pixel under the transformed centre is inside the dot.
    assert w[int((y1 + y2) / 2), int((x1 + x2) / 2)] > 0.5
    # Box side follows the zoom (rotation and warp only widen the AABB).
    side = 12.0 * (float(params.scale) if params.do_zoom else 1.0)
    assert x2 - x1 >= side * 0.75 and y2 - y1 >= side * 0.75
    checked += 1
  assert checked >= 25


def _numpy_dihedral():
  """Numpy image ops and their maps of a point (x, y) in a P-wide patch."""
  ops = {}
  for r in range(4):
    for flip in (False, True):
      def op(a, r=r, flip=flip):
        return np.rot90(np.fliplr(a) if flip else a, r)
      def pt(x, y, r=r, flip=flip):
        if flip:
          x = P - x
        for _ in range(r):  # np.rot90: out[i, j] = in[j, P - 1 - i].
          x, y = y, P - x
        return x, y
      ops[(r, flip)] = (op, pt)
  return ops


def test_dihedral_pixel_exact_and_boxes_match():
  rng = np.random.default_rng(1)
  crop = rng.integers(0, 256, (C, C, 3), dtype=np.uint8)
  patch = crop[M:M + P, M:M + P]
  centers = np.array([[M + 10.0, M + 20.0], [M + 40.5, M + 33.0]])
  ops = _numpy_dihedral()
  matched = {}
  for k in range(8):
    img, boxes, keep = _apply(crop, centers, [True, True], _params(k=k),
                              box_size=8.0)
    assert keep.all()
    hits = [name for name, (op, _) in ops.items()
            if np.abs(img * 255 - op(patch)).max() < 1e-3]
    assert len(hits) == 1, k
    matched[k] = hits[0]
    _, pt = ops[hits[0]]
    for (cx, cy), box in zip(centers - M, boxes):
      ex, ey = pt(cx, cy)
      np.testing.assert_allclose(box, [ex - 4, ey - 4, ex + 4, ey + 4],
                                 atol=1e-4)
  assert len(set(matched.values())) == 8
  # fastai's dihedral_affine: bit 0 flips x, bit 1 flips y, bit 2 swaps axes.
  assert matched[0] == (0, False)
  assert matched[1] == (0, True) and matched[2] == (2, True)
  np.testing.assert_array_equal(
      ops[matched[4]][0](patch), np.transpose(patch, (1, 0, 2)))


def _fastai_find_coeffs(orig_pts, targ_pts):
  """fastai v1's `_find_coeffs` in numpy: H with H(targ) = orig."""
  rows, rhs = [], []
  for (x, y), (u, v) in zip(targ_pts, orig_pts):
    rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
    rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    rhs += [u, v]
  return np.append(np.linalg.solve(np.array(rows), rhs), 1).reshape(3, 3)


def test_matrices_match_fastai():
  m = np.array([0.13, -0.2, 0.07, 0.18])
  deg, scale, row_pct, col_pct, k = 8.0, 1.6, 0.2, 0.9, 5
  orig = [[-1, -1], [-1, 1], [1, -1], [1, 1]]
  targ = [[-1 - m[3], -1 - m[1]], [-1 - m[2], 1 + m[1]],
          [1 + m[3], -1 - m[0]], [1 + m[2], 1 + m[0]]]
  h = _fastai_find_coeffs(orig, targ)
  a = math.radians(deg)
  r = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0],
                [0, 0, 1]])
  s = 1 - 1 / scale
  z = np.array([[1 / scale, 0, s * (2 * col_pct - 1)],
                [0, 1 / scale, s * (2 * row_pct - 1)], [0, 0, 1]])
  d = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]])  # k = 5: x = -1, swap.
  params = _params(k=k, warp=m, angle=deg, scale=scale, row_pct=row_pct,
                   col_pct=col_pct, do_warp=True, do_rotate=True,
                   do_zoom=True)
  np.testing.assert_allclose(augment.sampling_matrix(params), d @ r @ z @ h,
                             atol=2e-6)
  for flag, mat in (("do_warp", h), ("do_rotate", r), ("do_zoom", z)):
    only = _params(warp=m, angle=deg, scale=scale, row_pct=row_pct,
                   col_pct=col_pct, **{flag: True})
    np.testing.assert_allclose(augment.sampling_matrix(only), mat, atol=2e-6)


def test_objects_pushed_out_are_dropped():
  crop = np.zeros((C, C, 3), np.uint8)
  # Centre of the patch, a corner of the patch, and one deep in the margin.
  centers = np.array([[C / 2, C / 2], [M + 5.0, M + 5.0], [2.0, 2.0]])
  _, boxes, keep = _apply(crop, centers, [True, True, True],
                          _params(), box_size=10.0)
  np.testing.assert_array_equal(keep, [True, True, False])
  np.testing.assert_allclose(boxes[1], [0, 0, 10, 10], atol=1e-4)
  np.testing.assert_array_equal(boxes[2], 0)
  # Zooming x2 onto the bottom-right quarter pushes the top-left out.
  zoom = _params(do_zoom=True, scale=2.0, row_pct=1.0, col_pct=1.0)
  _, boxes, keep = _apply(crop, centers, [True, True, False], zoom,
                          box_size=10.0)
  np.testing.assert_array_equal(keep, [True, False, False])
  np.testing.assert_allclose(boxes[0], [0, 0, 10, 10], atol=1e-3)
  _, _, keep = _apply(crop, centers, [False, True, True], _params(),
                      box_size=10.0)
  assert not keep[0]  # Padding slots stay invalid.


def test_lighting_keeps_geometry_and_neutral_is_identity():
  rng = np.random.default_rng(2)
  crop = rng.integers(1, 255, (C, C, 3), dtype=np.uint8)
  centers = np.array([[C / 2 + 3, C / 2 - 7]])
  geo = dict(do_rotate=True, angle=7.0, do_warp=True,
             warp=np.array([0.1, -0.05, 0.02, 0.15], np.float32))
  base, boxes0, _ = _apply(crop, centers, [True], _params(**geo))
  neutral, _, _ = _apply(crop, centers, [True], _params(
      do_brightness=True, do_contrast=True, change=0.5, contrast=1.0, **geo))
  np.testing.assert_allclose(neutral, base, atol=1e-5)
  lit, boxes1, _ = _apply(crop, centers, [True], _params(
      do_brightness=True, do_contrast=True, change=0.7, contrast=1.8, **geo))
  np.testing.assert_array_equal(boxes0, boxes1)
  assert np.abs(lit - base).max() > 0.05
  x = base
  expected = 1 / (1 + np.exp(-(np.log(x / (1 - x)) + np.log(0.7 / 0.3)) * 1.8))
  np.testing.assert_allclose(lit, expected, atol=1e-5)


def test_disabled_is_normalised_centre_crop():
  rng = np.random.default_rng(3)
  crops = rng.integers(0, 256, (2, C, C, 3), dtype=np.uint8)
  mean, std = (0.6, 0.4, 0.7), (0.2, 0.25, 0.15)
  centers = np.full((2, 1, 2), C / 2)
  cfg = augment.AugmentConfig(enabled=False)
  img, boxes, keep = augment.augment_batch(
      jax.random.key(0), crops, centers, np.ones((2, 1), bool), patch_size=P,
      mean=mean, std=std, config=cfg)
  expected = (crops[:, M:M + P, M:M + P] / 255.0 - mean) / std
  np.testing.assert_allclose(np.asarray(img), expected, atol=1e-5)
  np.testing.assert_allclose(boxes[:, 0], [[7, 7, 57, 57]] * 2, atol=1e-5)
  assert np.asarray(keep).all()
  # The gather path with nothing firing gives the same.
  img2, boxes2, _ = augment.augment_batch(
      jax.random.key(0), crops, centers, np.ones((2, 1), bool), patch_size=P,
      mean=mean, std=std, config=augment.AugmentConfig(dihedral=False,
                                                       p_affine=0.0,
                                                       p_lighting=0.0))
  np.testing.assert_allclose(np.asarray(img2), expected, atol=1e-5)
  np.testing.assert_allclose(boxes2, boxes, atol=1e-5)


def test_jit_vmap_determinism_and_dtype():
  rng = np.random.default_rng(4)
  b, n = 4, 5
  crops = rng.integers(0, 256, (b, C, C, 3), dtype=np.uint8)
  centers = rng.uniform(M, M + P, (b, n, 2))
  valid = rng.random((b, n)) < 0.8

  @jax.jit
  def step(key, crops, centers, valid):
    return augment.augment_batch(key, crops, centers, valid, patch_size=P,
                                 mean=(0.5,) * 3, std=(0.2,) * 3,
                                 dtype=jnp.bfloat16)

  a = step(jax.random.key(7), crops, centers, valid)
  again = step(jax.random.key(7), crops, centers, valid)
  other = step(jax.random.key(8), crops, centers, valid)
  assert a[0].shape == (b, P, P, 3) and a[0].dtype == jnp.bfloat16
  assert a[1].shape == (b, n, 4) and a[2].shape == (b, n)
  for x, y in zip(a, again):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert not np.array_equal(np.asarray(a[0]), np.asarray(other[0]))
  assert not (np.asarray(a[2]) & ~valid).any()
  assert np.isfinite(np.asarray(a[0], np.float32)).all()
  # Each image uses its own key: image 0 alone matches image 0 of the batch.
  single = jax.jit(augment.augment_image, static_argnames=(
      "patch_size", "dtype"))(
      jnp.asarray(crops[0]), jnp.asarray(centers[0], jnp.float32),
      jnp.asarray(valid[0]),
      augment.sample_params(jax.random.split(jax.random.key(7), b)[0],
                            augment.AugmentConfig()),
      patch_size=P, mean=jnp.full(3, 0.5), std=jnp.full(3, 0.2),
      dtype=jnp.bfloat16)
  np.testing.assert_allclose(np.asarray(single[1]), np.asarray(a[1][0]),
                             atol=1e-3)


def test_transforms_fire_with_their_probability():
  n = 4000
  keys = jax.random.split(jax.random.key(0), n)
  p = jax.vmap(augment.sample_params, (0, None))(keys, augment.AugmentConfig())
  p = jax.tree.map(np.asarray, p)
  tol = 4 * math.sqrt(0.25 / n)
  for flag in (p.do_warp, p.do_rotate, p.do_zoom, p.do_brightness,
               p.do_contrast):
    assert abs(flag.mean() - 0.5) < tol
  # Independent draws: both fire about a quarter of the time.
  assert abs((p.do_warp & p.do_rotate).mean() - 0.25) < tol
  counts = np.bincount(p.k, minlength=8)
  assert counts.size == 8 and np.all(np.abs(counts / n - 1 / 8) < 0.025)
  assert np.abs(p.angle).max() <= 10 and np.abs(p.warp).max() <= 0.2
  assert p.scale.min() >= 1 and p.scale.max() <= 2
  assert p.change.min() >= 0.25 and p.change.max() <= 0.75
  assert p.contrast.min() >= 0.5 and p.contrast.max() <= 2
  # Log-uniform: half below 1 (a uniform draw on [0.5, 2] gives a third).
  assert abs((p.contrast < 1).mean() - 0.5) < tol
  off = jax.vmap(augment.sample_params, (0, None))(keys, OFF)
  assert not np.asarray(off.do_warp | off.do_zoom | off.do_contrast).any()


def test_sampling_beyond_crop_reflects():
  rng = np.random.default_rng(5)
  crop = rng.integers(0, 256, (C, C, 3), dtype=np.uint8)
  # An identity map onto a window three times the crop's side.
  wide = np.asarray(augment.warp_image(jnp.asarray(crop), jnp.eye(3), 3 * C))
  padded = np.pad(crop, ((C, C), (C, C), (0, 0)), mode="symmetric")
  np.testing.assert_array_equal(wide, padded.astype(np.float32))


def test_a_registered_colour_augmentation_runs_after_lighting(monkeypatch):
  """The seam: an entry of COLOUR_AUGMENTATIONS, named by the config, changes
  only the pixel values, with its own randomness; geometry and the other draws stay."""
  monkeypatch.setitem(augment.COLOUR_AUGMENTATIONS, "toy_invert",
                      lambda key, x: jnp.where(jax.random.bernoulli(key), 1.0 - x, x))
  rng = np.random.default_rng(5)
  b, n = 8, 3
  crops = rng.integers(0, 256, (b, C, C, 3), dtype=np.uint8)
  centers = rng.uniform(M, M + P, (b, n, 2))
  valid = np.ones((b, n), bool)
  mean, std = np.full(3, 0.5, np.float32), np.full(3, 0.2, np.float32)

  def run(config):
    return augment.augment_batch(jax.random.key(3), crops, centers, valid, patch_size=P,
                                 mean=mean, std=std, config=config)

  plain = run(augment.AugmentConfig())
  toy = run(augment.AugmentConfig(colour=("toy_invert",)))
  np.testing.assert_array_equal(np.asarray(plain[1]), np.asarray(toy[1]))  # Same boxes.
  x, y = np.asarray(plain[0]) * std + mean, np.asarray(toy[0]) * std + mean
  inverted = np.isclose(y, 1.0 - x, atol=1e-5).all(axis=(1, 2, 3))
  kept = np.isclose(y, x, atol=1e-5).all(axis=(1, 2, 3))
  assert (inverted | kept).all() and inverted.any() and kept.any()

  config = ml_collections.ConfigDict({"augment": dict(
      enabled=True, max_warp=0.2, max_rotate=10.0, max_zoom=2.0, p_affine=0.5,
      brightness=(0.25, 0.75), contrast=(0.5, 2.0), p_lighting=0.5, colour=("toy_invert",))})
  assert augment.AugmentConfig.from_config(config).colour == ("toy_invert",)
  config.augment.colour = ("nothing_registered",)
  with pytest.raises(ValueError, match="augment.colour 'nothing_registered'.*toy_invert"):
    augment.AugmentConfig.from_config(config)
