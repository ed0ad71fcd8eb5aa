"""Anchors, box coding, IoU and anchor matching of the reference RetinaNet.

Boxes inside the detector follow the reference code: (cy, cx, h, w) with the
patch mapped to [-1, 1] on both axes (y first). Ground truth arrives as
(x1, y1, x2, y2) in patch pixels plus a validity mask, so every function
works on fixed shapes and jits.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

ANCHOR_SCALES: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)
ANCHOR_RATIOS: tuple[float, ...] = (1.0,)
BOX_STD = (0.1, 0.1, 0.2, 0.2)  # Divisors of the encoded (cy, cx, h, w).
MATCH_THRESHOLD = 0.5  # IoU above this: positive.
BACKGROUND_THRESHOLD = 0.4  # IoU below this: background.

# Values of `match_anchors` for anchors that are not positive.
BACKGROUND = -1
IGNORED = -2


def feature_side(side: int, level: int) -> int:
  """Side of pyramid level `level` (each stride-2 step rounds up)."""
  for _ in range(level):
    side = -(-side // 2)
  return side


def level_for_side(patch_size: int, side: int) -> int:
  """The pyramid level whose feature map has `side` cells (`sizes=[32]`)."""
  for level in range(3, 8):
    if feature_side(patch_size, level) == side:
      return level
  raise ValueError(f"no pyramid level in P3..P7 has side {side} at "
                   f"{patch_size} px")


def anchor_grid(image_hw: Sequence[int], levels: Sequence[int],
                scales: Sequence[float] = ANCHOR_SCALES,
                ratios: Sequence[float] = ANCHOR_RATIOS) -> np.ndarray:
  """Anchors (cy, cx, h, w) in [-1, 1] for the given levels, [A, 4] float32.

  The order is level, row, column, then ratio-major anchor, which is how the
  heads' NHWC outputs flatten. An anchor of scale s is 4 * s cells wide, as in
  the reference: at stride 16 that is 64 * s px. Static shapes only, so this
  is NumPy and becomes a constant under jit.
  """
  aspects = np.array([[s * np.sqrt(r), s * np.sqrt(1 / r)]
                      for r in ratios for s in scales], np.float64)
  out = []
  for level in levels:
    gh, gw = (feature_side(int(image_hw[0]), level),
              feature_side(int(image_hw[1]), level))
    cy = np.linspace(-1 + 1 / gh, 1 - 1 / gh, gh) if gh > 1 else np.zeros(1)
    cx = np.linspace(-1 + 1 / gw, 1 - 1 / gw, gw) if gw > 1 else np.zeros(1)
    centres = np.stack(np.meshgrid(cy, cx, indexing="ij"), -1).reshape(-1, 1, 2)
    sizes = (4 * aspects * np.array([2 / gh, 2 / gw]))[None]
    n, a = centres.shape[0], sizes.shape[1]
    anchors = np.concatenate([np.broadcast_to(centres, (n, a, 2)),
                              np.broadcast_to(sizes, (n, a, 2))], -1)
    out.append(anchors.reshape(-1, 4))
  return np.concatenate(out, 0).astype(np.float32)


def xyxy_to_cthw(boxes: jax.Array, image_hw: Sequence[int]) -> jax.Array:
  """(x1, y1, x2, y2) pixels -> (cy, cx, h, w) in [-1, 1] over the patch."""
  h, w = float(image_hw[0]), float(image_hw[1])
  x1, y1, x2, y2 = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([(y1 + y2) / h - 1, (x1 + x2) / w - 1,
                    2 * (y2 - y1) / h, 2 * (x2 - x1) / w], -1)


def cthw_to_xyxy(boxes: jax.Array, image_hw: Sequence[int]) -> jax.Array:
  """(cy, cx, h, w) in [-1, 1] -> (x1, y1, x2, y2) pixels."""
  h, w = float(image_hw[0]), float(image_hw[1])
  cy, cx, bh, bw = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([(cx - bw / 2 + 1) * w / 2, (cy - bh / 2 + 1) * h / 2,
                    (cx + bw / 2 + 1) * w / 2, (cy + bh / 2 + 1) * h / 2], -1)


def cthw_to_tlbr(boxes: jax.Array) -> jax.Array:
  """(cy, cx, h, w) -> (y1, x1, y2, x2), same units."""
  return jnp.concatenate([boxes[..., :2] - boxes[..., 2:] / 2,
                          boxes[..., :2] + boxes[..., 2:] / 2], -1)


def tlbr_to_cthw(boxes: jax.Array) -> jax.Array:
  """(y1, x1, y2, x2) -> (cy, cx, h, w), same units."""
  return jnp.concatenate([(boxes[..., :2] + boxes[..., 2:]) / 2,
                          boxes[..., 2:] - boxes[..., :2]], -1)


def encode(boxes: jax.Array, anchors: jax.Array) -> jax.Array:
  """Regression targets of `boxes` on `anchors`, both (cy, cx, h, w)."""
  t_centres = (boxes[..., :2] - anchors[..., :2]) / anchors[..., 2:]
  t_sizes = jnp.log(boxes[..., 2:] / anchors[..., 2:] + 1e-8)
  return jnp.concatenate([t_centres, t_sizes], -1) / jnp.asarray(BOX_STD)


def decode(deltas: jax.Array, anchors: jax.Array, clamp: bool = True
           ) -> jax.Array:
  """Inverse of `encode`; with `clamp`, the box is clipped to the patch."""
  deltas = deltas * jnp.asarray(BOX_STD, deltas.dtype)
  centres = anchors[..., 2:] * deltas[..., :2] + anchors[..., :2]
  sizes = anchors[..., 2:] * jnp.exp(deltas[..., 2:])
  boxes = jnp.concatenate([centres, sizes], -1)
  if clamp:
    boxes = tlbr_to_cthw(jnp.clip(cthw_to_tlbr(boxes), -1.0, 1.0))
  return boxes


def iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """IoU of every box of `a` [..., A, 4] with every box of `b` [..., N, 4].

  Boxes are (cy, cx, h, w); the result is [..., A, N]. The 1e-8 in the
  denominator is the reference's.
  """
  ta, tb = cthw_to_tlbr(a)[..., :, None, :], cthw_to_tlbr(b)[..., None, :, :]
  top_left = jnp.maximum(ta[..., :2], tb[..., :2])
  bottom_right = jnp.minimum(ta[..., 2:], tb[..., 2:])
  sides = jnp.maximum(bottom_right - top_left, 0)
  inter = sides[..., 0] * sides[..., 1]
  area_a = (a[..., 2] * a[..., 3])[..., :, None]
  area_b = (b[..., 2] * b[..., 3])[..., None, :]
  return inter / (area_a + area_b - inter + 1e-8)


def match_anchors(anchors: jax.Array, gt: jax.Array, valid: jax.Array,
                  match_threshold: float = MATCH_THRESHOLD,
                  background_threshold: float = BACKGROUND_THRESHOLD
                  ) -> jax.Array:
  """Index of the matched ground truth per anchor, or BACKGROUND / IGNORED.

  anchors [A, 4] and gt [N, 4] are (cy, cx, h, w); valid [N] masks padding.
  Each anchor takes its best-overlapping ground truth: IoU > 0.5 positive,
  < 0.4 background, otherwise ignored. No ground truth is forced onto its
  best anchor, as in the reference. An image without valid ground truth has
  every anchor as background (padding overlaps nothing there either).
  """
  overlaps = jnp.where(valid[None, :], iou(anchors, gt), 0.0)
  if gt.shape[0] == 0:
    return jnp.full(anchors.shape[:1], BACKGROUND, jnp.int32)
  best = jnp.max(overlaps, axis=1)
  index = jnp.argmax(overlaps, axis=1).astype(jnp.int32)
  matches = jnp.where(best < background_threshold, BACKGROUND, IGNORED)
  return jnp.where(best > match_threshold, index, matches).astype(jnp.int32)
