"""The loss against a direct NumPy transcription of the reference code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from midog_jax.model import boxes as B
from midog_jax.model import losses as L

HW = (128, 128)


def _np_iou(anchors, targets):
  def tlbr(b):
    return np.concatenate([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], 1)
  a, t = tlbr(anchors)[:, None], tlbr(targets)[None]
  sides = np.clip(np.minimum(a[..., 2:], t[..., 2:])
                  - np.maximum(a[..., :2], t[..., :2]), 0, None)
  inter = sides[..., 0] * sides[..., 1]
  union = ((anchors[:, 2] * anchors[:, 3])[:, None]
           + (targets[:, 2] * targets[:, 3])[None] - inter)
  return inter / (union + 1e-8)


def _np_one_loss(clas_pred, bbox_pred, anchors, gt_xyxy, gt_valid, gamma,
                 alpha, reference_weights):
  """One image, step by step as `RetinaNetFocalLoss._one_loss`.

  Returns (box loss, focal loss, d box / d bbox_pred, d focal / d clas_pred),
  the gradients with the focal weights held constant.
  """
  # Unpad, then (x1, y1, x2, y2) px -> (cy, cx, h, w) in [-1, 1].
  g = gt_xyxy[gt_valid].astype(np.float64)
  h, w = HW
  tlbr = np.stack([g[:, 1] / h * 2 - 1, g[:, 0] / w * 2 - 1,
                   g[:, 3] / h * 2 - 1, g[:, 2] / w * 2 - 1], 1)
  bbox_tgt = np.concatenate([(tlbr[:, :2] + tlbr[:, 2:]) / 2,
                             tlbr[:, 2:] - tlbr[:, :2]], 1)
  clas_tgt = np.ones(len(bbox_tgt), np.int64)  # class 1: mitotic figure
  # Reference padding when there is no box: one empty box at the origin.
  if len(bbox_tgt) == 0:
    bbox_tgt, clas_tgt = np.zeros((1, 4)), np.zeros(1, np.int64)

  ious = _np_iou(anchors, bbox_tgt)
  matches = np.full(len(anchors), -2)
  vals, idxs = ious.max(1), ious.argmax(1)
  matches[vals < 0.4] = -1
  matches[vals > 0.5] = idxs[vals > 0.5]

  bbox_mask = matches >= 0
  n_pos = bbox_mask.sum()
  d_box = np.zeros_like(bbox_pred)
  if n_pos:
    tgt = bbox_tgt[matches[bbox_mask]]
    anc = anchors[bbox_mask]
    activ = np.concatenate([(tgt[:, :2] - anc[:, :2]) / anc[:, 2:],
                            np.log(tgt[:, 2:] / anc[:, 2:] + 1e-8)], 1)
    activ /= np.array([0.1, 0.1, 0.2, 0.2])
    diff = bbox_pred[bbox_mask] - activ
    ad = np.abs(diff)
    bb_loss = np.mean(np.where(ad < 1, 0.5 * ad**2, ad - 0.5))
    d_box[bbox_mask] = np.clip(diff, -1, 1) / diff.size
  else:
    bb_loss = 0.0

  matches = matches + 1
  clas_tgt = clas_tgt + 1
  clas_mask = matches >= 0
  preds = clas_pred[clas_mask]
  clas_tgt = np.concatenate([np.zeros(1, np.int64), clas_tgt])
  clas_tgt = clas_tgt[matches[clas_mask]]
  # encode_class: index 0 (background) is a row of zeros.
  encoded = np.zeros((len(clas_tgt), preds.shape[1]))
  rows = np.nonzero(clas_tgt != 0)[0]
  encoded[rows, clas_tgt[rows] - 2] = 1  # -1 for background, -1 for unpad
  ps = 1 / (1 + np.exp(-preds))
  weights = encoded * (1 - ps) + (1 - encoded) * ps
  if reference_weights:
    alphas = (1 - encoded) * alpha + encoded * (1 - alpha)
  else:
    alphas = (1 - encoded) * (1 - alpha) + encoded * alpha
  weights = weights**gamma * alphas
  bce = -(encoded * np.log(ps) + (1 - encoded) * np.log(1 - ps))
  norm = max(n_pos, 1)
  focal = np.sum(weights * bce) / norm
  d_cls = np.zeros_like(clas_pred)
  d_cls[clas_mask] = weights * (ps - encoded) / norm
  return bb_loss, focal, d_box, d_cls


def _random_batch(seed: int, batch: int = 4, n: int = 6):
  rng = np.random.default_rng(seed)
  anchors = B.anchor_grid(HW, (3, 4))
  a = anchors.shape[0]
  cls = rng.normal(-2, 2, (batch, a, 2)).astype(np.float32)
  box = rng.normal(0, 1.5, (batch, a, 4)).astype(np.float32)
  centres = rng.uniform(10, 118, (batch, n, 2))
  half = rng.choice([25.0, 25.0, 12.0, 30.0], (batch, n, 1))
  gt = np.concatenate([centres - half, centres + half], -1).astype(np.float32)
  valid = rng.uniform(size=(batch, n)) < 0.6
  valid[0] = False  # an image without mitotic figures
  valid[1, 0] = True
  if _has_near_tie(anchors, gt, valid):
    # Which of two equally good boxes wins is float rounding; avoid it.
    return _random_batch(seed + 1000, batch, n)
  return anchors, cls, box, gt, valid


def _has_near_tie(anchors, gt, valid) -> bool:
  for g, v in zip(gt, valid):
    if v.sum() < 2:
      continue
    cthw = np.asarray(B.xyxy_to_cthw(jnp.asarray(g[v]), HW), np.float64)
    top2 = np.sort(_np_iou(anchors.astype(np.float64), cthw), 1)[:, -2:]
    if np.any((top2[:, 1] > 0.4) & (top2[:, 1] - top2[:, 0] < 1e-4)):
      return True
  return False


@pytest.mark.parametrize("focal", ["reference", "standard"])
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_and_gradients_match_numpy(focal, seed):
  anchors, cls, box, gt, valid = _random_batch(seed)
  config = L.LossConfig(focal=focal)

  def loss_fn(cls, box):
    return L.retinanet_loss(cls, box, anchors, gt, valid, HW, config)

  (loss, metrics), (g_cls, g_box) = jax.jit(
      jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(cls, box)

  batch = cls.shape[0]
  ref = [_np_one_loss(cls[i].astype(np.float64), box[i].astype(np.float64),
                      anchors.astype(np.float64), gt[i], valid[i], 2.0, 0.25,
                      focal == "reference") for i in range(batch)]
  ref_box = sum(r[0] for r in ref) / batch
  ref_focal = sum(r[1] for r in ref) / batch
  assert sum(r[0] > 0 for r in ref) >= 2, "test batch needs positives"
  np.testing.assert_allclose(metrics["box"], ref_box, rtol=1e-5)
  np.testing.assert_allclose(metrics["focal"], ref_focal, rtol=1e-5)
  np.testing.assert_allclose(loss, ref_box + ref_focal, rtol=1e-5)
  np.testing.assert_allclose(g_box, np.stack([r[2] for r in ref]) / batch,
                             rtol=1e-4, atol=1e-8)
  np.testing.assert_allclose(g_cls, np.stack([r[3] for r in ref]) / batch,
                             rtol=1e-4, atol=1e-8)


def test_focal_variants_weigh_positives_differently():
  logits = jnp.zeros((2,))
  targets = jnp.array([1.0, 0.0])
  ref = L.sigmoid_focal_loss(logits, targets, 2.0,
                             L.LossConfig().positive_weight)
  std = L.sigmoid_focal_loss(logits, targets, 2.0,
                             L.LossConfig(focal="standard").positive_weight)
  # At p = 0.5 both terms are 0.25 * log 2 times the class weight.
  base = 0.25 * np.log(2)
  np.testing.assert_allclose(ref, [0.75 * base, 0.25 * base], rtol=1e-6)
  np.testing.assert_allclose(std, [0.25 * base, 0.75 * base], rtol=1e-6)
  with pytest.raises(ValueError):
    _ = L.LossConfig(focal="other").positive_weight


def test_ignored_anchors_and_empty_images():
  # One anchor with IoU 0.45 (ignored), one background, no positives.
  anchors = np.array([[0.0, 0.0, 0.5, 0.5], [0.9, 0.9, 0.1, 0.1]], np.float32)
  gt_cthw = np.array([[0.0, 0.0, 0.225, 0.5]], np.float32)  # IoU 0.45
  gt = np.asarray(B.cthw_to_xyxy(jnp.asarray(gt_cthw), HW))[None]
  cls = np.array([[[5.0, 5.0], [0.0, 0.0]]], np.float32)
  box = np.ones((1, 2, 4), np.float32)
  loss, m = L.retinanet_loss(cls, box, anchors, gt, np.ones((1, 1), bool), HW)
  # Only the background anchor counts: 2 columns of 0.25 * 0.5**2 * log 2.
  background = 2 * 0.25 * 0.25 * np.log(2)
  np.testing.assert_allclose(m["focal"], background, rtol=1e-5)
  assert float(m["box"]) == 0.0 and int(m["num_positives"]) == 0
  # Without ground truth, both anchors are background.
  _, m = L.retinanet_loss(cls, box, anchors, gt, np.zeros((1, 1), bool), HW)
  p = 1 / (1 + np.exp(-5.0))
  confident = 2 * 0.25 * p**2 * -np.log(1 - p)
  np.testing.assert_allclose(m["focal"], background + confident, rtol=1e-5)
