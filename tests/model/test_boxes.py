"""Anchors, box coding, IoU and matching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from midog_jax.model import boxes as B


def _square(side: float, cy: float = 0.0, cx: float = 0.0) -> list[float]:
  return [cy, cx, side, side]


def test_anchor_grid_reference_layout():
  anchors = B.anchor_grid((512, 512), (4,))
  assert anchors.shape == (32 * 32 * 5, 4)
  grid = anchors.reshape(32, 32, 5, 4)
  # Cell centres of a 32 x 32 grid over [-1, 1], y first.
  centres = -1 + (2 * np.arange(32) + 1) / 32
  np.testing.assert_allclose(grid[:, 0, 0, 0], centres, atol=1e-6)
  np.testing.assert_allclose(grid[0, :, 0, 1], centres, atol=1e-6)
  np.testing.assert_allclose(grid[3, 7, :, 0], centres[3], atol=1e-6)
  np.testing.assert_allclose(grid[3, 7, :, 1], centres[7], atol=1e-6)
  # Sides 0.2..1.0 of 64 px, as pixels.
  xyxy = np.asarray(B.cthw_to_xyxy(jnp.asarray(grid[0, 0]), (512, 512)))
  np.testing.assert_allclose(xyxy[:, 2] - xyxy[:, 0],
                             64 * np.array(B.ANCHOR_SCALES), rtol=1e-5)
  np.testing.assert_allclose(xyxy[:, 3] - xyxy[:, 1],
                             64 * np.array(B.ANCHOR_SCALES), rtol=1e-5)
  # Centre of the first cell is (8, 8) px at stride 16.
  np.testing.assert_allclose((xyxy[:, :2] + xyxy[:, 2:]) / 2, 8.0, atol=1e-4)


def test_anchor_grid_levels_concatenate_in_order():
  both = B.anchor_grid((128, 96), (3, 5))
  p3, p5 = B.anchor_grid((128, 96), (3,)), B.anchor_grid((128, 96), (5,))
  assert p3.shape[0] == 16 * 12 * 5 and p5.shape[0] == 4 * 3 * 5
  np.testing.assert_array_equal(both, np.concatenate([p3, p5]))


def test_level_for_side_matches_reference_sizes():
  assert B.level_for_side(512, 32) == 4
  assert B.level_for_side(512, 64) == 3
  assert B.level_for_side(256, 32) == 3
  assert B.feature_side(100, 5) == 4  # ceil at each stride-2 step
  with pytest.raises(ValueError):
    B.level_for_side(512, 31)


def test_xyxy_cthw_round_trip():
  hw = (128, 96)
  full = B.xyxy_to_cthw(jnp.array([0.0, 0.0, 96.0, 128.0]), hw)
  np.testing.assert_allclose(full, [0, 0, 2, 2], atol=1e-6)
  # A 50 x 50 box centred at (x=30, y=70).
  box = jnp.array([5.0, 45.0, 55.0, 95.0])
  cthw = B.xyxy_to_cthw(box, hw)
  np.testing.assert_allclose(cthw, [70 / 64 - 1, 30 / 48 - 1, 100 / 128,
                                    100 / 96], rtol=1e-6)
  np.testing.assert_allclose(B.cthw_to_xyxy(cthw, hw), box, rtol=1e-6)


def test_encode_decode_identity():
  rng = np.random.default_rng(0)
  anchors = jnp.asarray(B.anchor_grid((128, 128), (3, 4)))
  n = anchors.shape[0]
  centres = rng.uniform(-0.6, 0.6, (n, 2))
  sides = rng.uniform(0.05, 0.7, (n, 2))
  gt = jnp.asarray(np.concatenate([centres, sides], 1), jnp.float32)
  deltas = B.encode(gt, anchors)
  # These boxes lie inside the patch, so clamping changes nothing.
  np.testing.assert_allclose(B.decode(deltas, anchors), gt, atol=1e-5)
  np.testing.assert_allclose(B.decode(deltas, anchors, clamp=False), gt,
                             atol=1e-5)
  # And the other way round, for arbitrary regression outputs.
  raw = jnp.asarray(rng.normal(size=(n, 4)), jnp.float32)
  np.testing.assert_allclose(
      B.encode(B.decode(raw, anchors, clamp=False), anchors), raw, atol=1e-4)


def test_decode_clamps_to_patch():
  anchor = jnp.array([_square(0.5, cy=0.9, cx=-0.9)])
  box = B.decode(jnp.array([[5.0, -5.0, 3.0, 3.0]]), anchor)
  tlbr = np.asarray(B.cthw_to_tlbr(box))
  assert tlbr.min() >= -1 and tlbr.max() <= 1
  np.testing.assert_allclose(tlbr[0, [2, 1]], [1.0, -1.0])


def test_encode_scaling():
  anchor = jnp.array([[0.0, 0.0, 0.5, 0.25]])
  gt = jnp.array([[0.05, -0.025, 1.0, 0.25]])
  # t_c = (g - a) / a_hw / 0.1; t_s = log(g_hw / a_hw) / 0.2.
  expected = [0.05 / 0.5 / 0.1, -0.025 / 0.25 / 0.1, np.log(2.0) / 0.2, 0.0]
  np.testing.assert_allclose(B.encode(gt, anchor)[0], expected, atol=1e-5)


def test_iou_hand_made():
  a = jnp.array([_square(2.0), _square(2.0, cy=10.0)])
  b = jnp.array([
      _square(2.0),  # identical
      [0.0, 1.0, 2.0, 2.0],  # shifted by half a side: 2 / 6
      _square(1.0),  # nested, quarter of the area
      [0.0, 2.0, 2.0, 2.0],  # touching edges only
  ])
  got = np.asarray(B.iou(a, b))
  assert got.shape == (2, 4)
  np.testing.assert_allclose(got[0], [1.0, 1 / 3, 0.25, 0.0], atol=1e-6)
  np.testing.assert_allclose(got[1], 0.0, atol=1e-7)
  # Symmetric, and batched over a leading axis.
  np.testing.assert_allclose(B.iou(b, a), got.T, atol=1e-7)
  assert B.iou(a[None], b[None]).shape == (1, 2, 4)


def test_matching_threshold_edges():
  # Unit-square anchors, each paired with a same-centre box of height h;
  # IoU is then exactly h (dyadic h, so no rounding).
  heights = [0.5 + 1 / 64, 0.5, 13 / 32, 25 / 64, 0.75, 0.0]
  anchors, gt = [], []
  for i, h in enumerate(heights):
    anchors.append(_square(1.0, cx=10.0 * i))
    gt.append([0.0, 10.0 * i, h, 1.0])
  anchors, gt = jnp.array(anchors), jnp.array(gt)
  valid = jnp.array([True] * 5 + [False])
  overlaps = np.diag(np.asarray(B.iou(anchors, gt)))
  np.testing.assert_array_equal(overlaps[:5], heights[:5])
  matches = np.asarray(jax.jit(B.match_anchors)(anchors, gt, valid))
  np.testing.assert_array_equal(
      matches, [0, B.IGNORED, B.IGNORED, B.BACKGROUND, 4, B.BACKGROUND])


def test_matching_picks_best_and_skips_padding():
  anchors = jnp.array([_square(1.0), _square(1.0, cx=5.0)])
  gt = jnp.array([
      _square(1.0, cx=5.0),  # perfect for anchor 1, but padding
      [0.0, 0.0, 0.6, 1.0],  # IoU 0.6 with anchor 0
      [0.0, 0.0, 0.9, 1.0],  # IoU 0.9 with anchor 0
      [0.0, 5.0, 0.45, 1.0],  # IoU 0.45 with anchor 1
  ])
  valid = jnp.array([False, True, True, True])
  np.testing.assert_array_equal(B.match_anchors(anchors, gt, valid),
                                [2, B.IGNORED])
  # No forced match: a box overlapping nothing well leaves anchors alone.
  small = jnp.array([[0.0, 0.0, 0.3, 0.3]])
  np.testing.assert_array_equal(
      B.match_anchors(anchors, small, jnp.array([True])),
      [B.BACKGROUND, B.BACKGROUND])
  # Without valid ground truth every anchor is background.
  np.testing.assert_array_equal(
      B.match_anchors(anchors, gt, jnp.zeros(4, bool)),
      [B.BACKGROUND, B.BACKGROUND])
