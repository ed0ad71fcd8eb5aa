"""The reference RetinaNet loss: focal loss plus smooth L1 on positives.

Per image, as the reference's `RetinaNetFocalLoss`: anchors are matched to
the ground truth; ignored anchors (IoU in [0.4, 0.5]) leave the focal loss;
the focal loss is summed over the remaining anchors and class columns and
divided by max(#positives, 1); the box loss is smooth L1 (beta 1) averaged
over the positives' four coordinates (0 without positives). The total is
the mean over images of (box + focal).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from midog_jax.model import boxes as box_lib


@dataclasses.dataclass(frozen=True)
class LossConfig:
  gamma: float = 2.0
  # "reference": weight 0.75 on positives, 0.25 on negatives (what the
  # reference's alpha=0.25 computes); "standard": alpha=0.25 on positives.
  focal: str = "reference"
  alpha: float = 0.25
  match_threshold: float = box_lib.MATCH_THRESHOLD
  background_threshold: float = box_lib.BACKGROUND_THRESHOLD

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "LossConfig":
    """The loss of a run's `config`."""
    return cls(gamma=config.loss.gamma, focal=config.loss.focal)

  @property
  def positive_weight(self) -> float:
    if self.focal == "reference":
      return 1.0 - self.alpha
    if self.focal == "standard":
      return self.alpha
    raise ValueError(f"unknown focal loss variant {self.focal!r}")


def sigmoid_focal_loss(logits: jax.Array, targets: jax.Array, gamma: float,
                       positive_weight: float) -> jax.Array:
  """Elementwise focal loss; the modulating weight carries no gradient."""
  logits = logits.astype(jnp.float32)
  p = jax.nn.sigmoid(logits)
  modulating = targets * (1 - p) + (1 - targets) * p
  alphas = targets * positive_weight + (1 - targets) * (1 - positive_weight)
  weights = jax.lax.stop_gradient(modulating**gamma * alphas)
  # Binary cross-entropy on logits, in the stable form torch uses.
  bce = (jnp.maximum(logits, 0) - logits * targets
         + jnp.log1p(jnp.exp(-jnp.abs(logits))))
  return weights * bce


def smooth_l1(x: jax.Array, beta: float = 1.0) -> jax.Array:
  """Elementwise smooth L1 of a difference `x`."""
  ax = jnp.abs(x)
  return jnp.where(ax < beta, 0.5 * ax * ax / beta, ax - 0.5 * beta)


def image_loss(cls_logits: jax.Array, box_deltas: jax.Array,
               anchors: jax.Array, gt: jax.Array, valid: jax.Array,
               labels: jax.Array, config: LossConfig
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(box loss, focal loss, #positives) of one image.

  cls_logits [A, C], box_deltas [A, 4], anchors [A, 4] and gt [N, 4] in
  (cy, cx, h, w), valid [N] bool, labels [N] int class columns.
  """
  matches = box_lib.match_anchors(anchors, gt, valid, config.match_threshold,
                                  config.background_threshold)
  positive = matches >= 0
  counted = matches != box_lib.IGNORED
  index = jnp.maximum(matches, 0)
  num_pos = positive.sum()

  # One-hot without a background column: background is a row of zeros.
  num_classes = cls_logits.shape[-1]
  onehot = jax.nn.one_hot(labels[index], num_classes, dtype=jnp.float32)
  targets = onehot * positive[:, None]
  focal = sigmoid_focal_loss(cls_logits, targets, config.gamma,
                             config.positive_weight)
  focal = jnp.sum(focal * counted[:, None]) / jnp.maximum(num_pos, 1)

  box_targets = box_lib.encode(gt[index], anchors)
  per_coord = smooth_l1(box_deltas.astype(jnp.float32) - box_targets)
  per_coord = jnp.where(positive[:, None], per_coord, 0.0)
  box = jnp.sum(per_coord) / (4 * jnp.maximum(num_pos, 1))
  return box, focal, num_pos


def retinanet_loss(cls_logits: jax.Array, box_deltas: jax.Array,
                   anchors: jax.Array, gt_boxes: jax.Array,
                   gt_valid: jax.Array, image_hw: Sequence[int],
                   config: LossConfig = LossConfig(),
                   gt_labels: jax.Array | None = None
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Batch loss and metrics.

  cls_logits [B, A, C], box_deltas [B, A, 4], anchors [A, 4] (cy, cx, h, w),
  gt_boxes [B, N, 4] as (x1, y1, x2, y2) pixels, gt_valid [B, N], gt_labels
  [B, N] class columns (default: all column 0, the mitotic figure).
  """
  gt = box_lib.xyxy_to_cthw(gt_boxes.astype(jnp.float32), image_hw)
  if gt_labels is None:
    gt_labels = jnp.zeros(gt_valid.shape, jnp.int32)
  anchors = jnp.asarray(anchors, jnp.float32)
  box, focal, num_pos = jax.vmap(
      lambda c, b, g, v, l: image_loss(c, b, anchors, g, v, l, config))(
          cls_logits, box_deltas, gt, gt_valid.astype(bool), gt_labels)
  box, focal = box.mean(), focal.mean()
  loss = box + focal
  return loss, {"loss": loss, "focal": focal, "box": box,
                "num_positives": num_pos.sum()}
