"""Sliding-window detection: windows, suppression, and the jitted detector."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from midog_jax import sharding
from midog_jax.data.normalization import Normalization
from midog_jax.detection import sliding_window as I
from midog_jax.model import boxes as box_lib
from midog_jax.model import retinanet as M
from midog_jax.training import steps

NORM = Normalization((200.0, 150.0, 180.0), (40.0, 50.0, 30.0))


# --- windows -----------------------------------------------------------------


def test_window_origins_stride_460_at_512():
  origins = I.window_origins(2000, 1000, 512)
  xs, ys = np.unique(origins[:, 0]), np.unique(origins[:, 1])
  np.testing.assert_array_equal(xs, [0, 460, 920, 1380, 2000 - 512])
  np.testing.assert_array_equal(ys, [0, 460, 1000 - 512])
  assert len(origins) == len(xs) * len(ys)
  # Row-major: x varies fastest.
  np.testing.assert_array_equal(origins[:2], [[0, 0], [460, 0]])


@pytest.mark.parametrize("width,height,patch", [(7215, 5412, 512),
                                                (512, 512, 512),
                                                (513, 900, 512),
                                                (200, 130, 64)])
def test_window_origins_cover_image_and_end_at_border(width, height, patch):
  origins = I.window_origins(width, height, patch)
  covered = np.zeros((height, width), bool)
  for x0, y0 in origins:
    covered[y0:y0 + patch, x0:x0 + patch] = True
  assert covered.all()
  assert (origins >= 0).all()
  assert origins[:, 0].max() + patch == width
  assert origins[:, 1].max() + patch == height
  steps_x = np.diff(np.unique(origins[:, 0]))
  assert (steps_x <= int(patch * 0.9)).all() and (steps_x > 0).all()
  assert (steps_x <= patch - I.MIN_OVERLAP).all()  # At least one box of overlap.


def test_small_patches_overlap_by_at_least_one_box():
  # 10 % of 128 px is 12 px, narrower than a 50 px figure: the stride is 78.
  xs = np.unique(I.window_origins(400, 128, 128)[:, 0])
  np.testing.assert_array_equal(xs, [0, 78, 156, 234, 272])
  with pytest.raises(ValueError, match="bad patch"):
    I.window_origins(400, 128, 48)


def test_small_image_gets_one_padded_window():
  image = np.random.default_rng(0).integers(0, 255, (40, 50, 3), np.uint8)
  origins = I.window_origins(50, 40, 64)
  np.testing.assert_array_equal(origins, [[0, 0]])
  windows = I.crop_windows(image, origins, 64, batch_size=3)
  assert windows.shape == (3, 64, 64, 3) and windows.dtype == np.uint8
  np.testing.assert_array_equal(windows[0, :40, :50], image)
  assert (windows[0, 40:] == I.PAD_VALUE).all()
  assert (windows[0, :, 50:] == I.PAD_VALUE).all()
  assert (windows[1:] == I.PAD_VALUE).all()


def test_one_axis_smaller_than_window():
  origins = I.window_origins(50, 200, 64)
  assert set(origins[:, 0]) == {0}
  assert origins[:, 1].max() == 200 - 64


# --- suppression by distance -------------------------------------------------


def test_suppress_by_distance_keeps_best_and_is_greedy():
  xy = np.array([[0, 0], [10, 0], [30, 0], [100, 100]], float)
  scores = np.array([0.5, 0.9, 0.8, 0.1])
  # 1 (0.9) drops 0 (10 px); 2 is 20 px from 1: dropped too; 3 is far.
  np.testing.assert_array_equal(I.suppress_by_distance(xy, scores, 25), [1, 3])
  # Only kept points suppress: 0 drops 1, then 2 (20 px from the dropped 1,
  # 30 px from 0) survives.
  scores = np.array([0.9, 0.8, 0.7, 0.1])
  np.testing.assert_array_equal(I.suppress_by_distance(xy, scores, 25),
                                [0, 2, 3])


def test_suppress_by_distance_radius_edge_is_inclusive():
  # (15, 20) is exactly 25 px from the origin: within the radius.
  xy = np.array([[0, 0], [15, 20]], float)
  scores = np.array([0.9, 0.8])
  np.testing.assert_array_equal(I.suppress_by_distance(xy, scores, 25.0), [0])
  xy = np.array([[0, 0], [15, 20.001]], float)
  np.testing.assert_array_equal(I.suppress_by_distance(xy, scores, 25.0),
                                [0, 1])


def test_suppress_by_distance_ties_keep_lower_index():
  xy = np.array([[50, 50], [0, 0], [5, 5]], float)
  scores = np.array([0.7, 0.7, 0.7])
  np.testing.assert_array_equal(I.suppress_by_distance(xy, scores, 25),
                                [0, 1])


def test_suppress_by_distance_empty_and_single():
  assert I.suppress_by_distance(np.zeros((0, 2)), np.zeros(0)).shape == (0,)
  np.testing.assert_array_equal(
      I.suppress_by_distance(np.ones((1, 2)), np.ones(1)), [0])


# --- per-window NMS ----------------------------------------------------------


def _nms(boxes, scores, valid, iou=0.4, max_out=4):
  kept, ok = jax.jit(I.nms, static_argnums=(3, 4))(
      jnp.asarray(boxes, jnp.float32), jnp.asarray(scores, jnp.float32),
      jnp.asarray(valid), iou, max_out)
  return [int(k) for k, v in zip(kept, ok) if v]


def test_nms_hand_made():
  boxes = np.array([
      [0, 0, 10, 10],   # 0: score 0.6
      [1, 0, 11, 10],   # 1: IoU 0.82 with 0, score 0.9 -> kept first
      [20, 20, 30, 30],  # 2: alone
      [5, 0, 15, 10],   # 3: IoU 1/3 with 0, 0.43 with 1 -> dropped
      [24, 20, 34, 30],  # 4: IoU 0.43 with 2 -> dropped
      [26, 20, 36, 30],  # 5: IoU 0.25 with 2 -> kept
  ], float)
  scores = np.array([0.6, 0.9, 0.8, 0.7, 0.5, 0.4])
  valid = np.ones(6, bool)
  assert _nms(boxes, scores, valid, max_out=6) == [1, 2, 5]
  # Without box 1, box 0 is kept and 3 (IoU 1/3 <= 0.4) survives beside it.
  valid[1] = False
  assert _nms(boxes, scores, valid, max_out=6) == [2, 3, 0, 5]
  # The output is capped at max_out, best first.
  assert _nms(boxes, scores, valid, max_out=2) == [2, 3]


def test_nms_threshold_is_strict_and_shapes_fixed():
  # IoU of these two is exactly 0.5: kept at threshold 0.5, dropped at 0.49.
  boxes = np.array([[0, 0, 30, 10], [10, 0, 40, 10]], float)
  scores = np.array([0.9, 0.8])
  assert _nms(boxes, scores, [True, True], iou=0.5) == [0, 1]
  assert _nms(boxes, scores, [True, True], iou=0.49) == [0]
  assert _nms(boxes, scores, [False, False]) == []
  kept, ok = I.nms(jnp.zeros((2, 4)), jnp.ones(2), jnp.ones(2, bool), 0.4, 5)
  assert kept.shape == (5,) and ok.shape == (5,)


def test_nms_ties_keep_lower_index():
  boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], float)
  assert _nms(boxes, [0.5, 0.7, 0.7], [True] * 3) == [1]


# --- the detector with a known forward ---------------------------------------

PATCH = 64
FAKE_ANCHORS = box_lib.anchor_grid((PATCH, PATCH), (4,), (0.1,))  # 6.4 px.
CELL = 16


def fake_forward(params, batch_stats, images):
  """Fires once per 16 px cell holding dark pixels, centred on them.

  A dark pixel of value v (< 128 in channel 0, after undoing the
  normalisation) gives logit `params["gain"] * (3 - v / 50)`; the box deltas
  move the anchor's centre onto the dark pixels' centroid.
  """
  del batch_stats
  raw = (images[..., 0] * NORM.unit_std[0] + NORM.unit_mean[0]) * 255
  b, g = images.shape[0], PATCH // CELL
  mask = (raw < 127.5).astype(jnp.float32).reshape(b, g, CELL, g, CELL)
  ys = (jnp.arange(PATCH, dtype=jnp.float32) + 0.5).reshape(1, g, CELL, 1, 1)
  xs = (jnp.arange(PATCH, dtype=jnp.float32) + 0.5).reshape(1, 1, 1, g, CELL)
  count = mask.sum((2, 4))
  denom = jnp.maximum(count, 1)
  cy = (mask * ys).sum((2, 4)) / denom
  cx = (mask * xs).sum((2, 4)) / denom
  value = (raw.reshape(b, g, CELL, g, CELL) * mask).sum((2, 4)) / denom
  logit = jnp.where(count > 0, params["gain"] * (3 - value / 50), -30.0)
  anchors = jnp.asarray(FAKE_ANCHORS)
  target = (jnp.stack([cy.reshape(b, -1), cx.reshape(b, -1)], -1)
            / (PATCH / 2) - 1)
  deltas = (target - anchors[:, :2]) / anchors[:, 2:] / 0.1
  deltas = jnp.concatenate([deltas, jnp.zeros_like(deltas)], -1)
  logits = jnp.stack([logit.reshape(b, -1), jnp.full((b, g * g), -30.0)], -1)
  return logits, deltas, FAKE_ANCHORS


def _fake_detector(mesh=None, threshold=0.5):
  return I.make_window_detector(fake_forward, NORM, PATCH, 4, threshold,
                                mesh=mesh)


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def test_detector_outputs_known_centres():
  windows = np.full((2, PATCH, PATCH, 3), 255, np.uint8)
  windows[0, 10, 20] = 0      # score sigmoid(3)
  windows[0, 40, 50] = 100    # score sigmoid(1)
  windows[1, 33, 5] = 200     # not dark: nothing
  detect = _fake_detector()
  centres, scores, valid = jax.device_get(detect({"gain": 1.0}, {}, windows))
  assert centres.shape == (2, 4, 2) and scores.shape == valid.shape == (2, 4)
  np.testing.assert_array_equal(valid, [[1, 1, 0, 0], [0, 0, 0, 0]])
  np.testing.assert_allclose(centres[0, :2], [[20.5, 10.5], [50.5, 40.5]],
                             atol=1e-3)
  np.testing.assert_allclose(scores[0, :2], _sigmoid(np.array([3.0, 1.0])),
                             rtol=1e-5)
  # The threshold is traced: a new value gives new results, no new compile.
  _, _, valid = detect({"gain": 1.0}, {}, windows, threshold=0.8)
  np.testing.assert_array_equal(np.asarray(valid[0]), [1, 0, 0, 0])
  assert detect.jitted._cache_size() == 1


def test_detect_image_across_window_boundaries():
  # 64 px windows, stride 57: x origins 0, 57, 114, 136 (=200-64).
  h, w = 130, 200
  image = np.full((h, w, 3), 255, np.uint8)
  marks = {  # (x, y): value; each is the only dark pixel of its cells.
      (60, 30): 0,      # In the overlap of windows x0=0 and x0=57.
      (20, 100): 50,    # In the overlap of windows y0=57 and y0=66.
      (150, 20): 100,   # Windows x0=114 and x0=136 both see it.
      (165, 35): 20,    # 21 px from (150, 20) with a higher score.
      (100, 60): 120,
  }
  for (x, y), v in marks.items():
    image[y, x] = v
  xy, scores = I.detect_image(image, _fake_detector(), {"gain": 1.0}, {},
                              PATCH, batch_size=4, threshold=0.1,
                              progress=False, min_overlap=0)
  expected = [((x + 0.5, y + 0.5), _sigmoid(3 - v / 50))
              for (x, y), v in marks.items() if (x, y) != (150, 20)]
  expected.sort(key=lambda e: -e[1])
  assert len(xy) == len(expected)  # Each object once.
  np.testing.assert_allclose(xy, [e[0] for e in expected], atol=1e-3)
  np.testing.assert_allclose(scores, [e[1] for e in expected], rtol=1e-5)
  # Before distance suppression, objects in overlaps come from two windows.
  origins = I.window_origins(w, h, PATCH, min_overlap=0)
  out = _fake_detector(threshold=0.1)({"gain": 1.0}, {},
                                      I.crop_windows(image, origins, PATCH))
  raw_xy, _ = I.to_image_coordinates(origins, *jax.device_get(out), (h, w))
  assert len(raw_xy) == 2 * len(marks)


def test_detect_image_drops_detections_in_padding():
  image = np.full((40, 50, 3), 255, np.uint8)
  image[12, 30] = 0
  # Dark padding (value 60, below the marker's score) makes the fake model
  # fire in padded cells; those detections must not reach the output.
  windows = I.crop_windows(image, I.window_origins(50, 40, PATCH), PATCH,
                           pad_value=60)
  centres, _, valid = jax.device_get(
      _fake_detector(threshold=0.1)({"gain": 1.0}, {}, windows))
  outside = (centres[..., 0] >= 50) | (centres[..., 1] >= 40)
  assert (valid & outside).sum() >= 2
  xy, scores = I.detect_image(image, _fake_detector(), {"gain": 1.0}, {},
                              PATCH, 2, pad_value=60, threshold=0.1,
                              progress=False)
  np.testing.assert_allclose(xy, [[30.5, 12.5]], atol=1e-3)
  np.testing.assert_allclose(scores, [_sigmoid(3.0)], rtol=1e-5)


def test_fake_detector_same_on_one_and_four_devices():
  rng = np.random.default_rng(1)
  image = np.full((150, 180, 3), 255, np.uint8)
  for x, y in rng.integers(0, [180, 150], (20, 2)):
    image[y, x] = rng.integers(0, 120)
  results = []
  for n in (1, 4):
    mesh = sharding.make_mesh(jax.devices()[:n])
    params = sharding.replicate({"gain": jnp.float32(1.0)}, mesh)
    results.append(I.detect_image(image, _fake_detector(mesh), params, {},
                                  PATCH, 8, threshold=0.1, progress=False))
  assert len(results[0][0]) > 3
  np.testing.assert_allclose(results[0][0], results[1][0], atol=1e-4)
  np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5)


def test_mesh_rejects_batch_not_multiple_of_devices():
  mesh = sharding.make_mesh(jax.devices()[:4])
  with pytest.raises(ValueError, match="multiple"):
    _fake_detector(mesh)({"gain": 1.0}, {},
                         np.zeros((6, PATCH, PATCH, 3), np.uint8))


# --- the real model ----------------------------------------------------------


@pytest.fixture(scope="module")
def retinanet():
  return steps.split_model(M.build_model(M.RetinaNetConfig(), seed=0))


def test_model_detector_shapes_and_consistency(retinanet):
  graphdef, params, batch_stats = retinanet
  windows = np.random.default_rng(2).integers(0, 256, (2, PATCH, PATCH, 3),
                                              np.uint8)
  detect = I.make_detector(graphdef, NORM, PATCH, 5, 0.0)
  centres, scores, valid = jax.device_get(detect(params, batch_stats, windows))
  assert centres.shape == (2, 5, 2)
  assert valid.all()  # Threshold 0: every anchor is a candidate.
  assert (np.diff(scores, axis=1) <= 0).all()
  assert ((centres >= 0) & (centres <= PATCH)).all()
  # The top detection is the best-scoring anchor of the plain forward pass.
  images = (windows / 255.0 - NORM.unit_mean) / NORM.unit_std
  logits, _ = M.make_forward(graphdef)(params, batch_stats,
                                       jnp.asarray(images, jnp.float32))
  np.testing.assert_allclose(scores[:, 0], np.max(M.scores(logits), axis=1),
                             rtol=1e-5)
  # Above every score: nothing.
  _, _, valid = detect(params, batch_stats, windows, threshold=1.0)
  assert not np.asarray(valid).any()


def test_model_detection_same_on_one_and_four_devices(retinanet):
  graphdef, params, batch_stats = retinanet
  image = np.random.default_rng(3).integers(0, 256, (100, 150, 3), np.uint8)
  results = []
  for n in (1, 4):
    mesh = sharding.make_mesh(jax.devices()[:n])
    detect = I.make_detector(graphdef, NORM, PATCH, 8, 0.0, mesh=mesh)
    p, b = sharding.replicate((params, batch_stats), mesh)
    results.append(I.detect_image(image, detect, p, b, PATCH, 4,
                                  progress=False))
  assert len(results[0][0]) > 0
  np.testing.assert_allclose(results[0][0], results[1][0], atol=1e-3)
  np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-4)


def test_detect_image_rejects_bad_input():
  detect = _fake_detector()
  with pytest.raises(ValueError, match="uint8"):
    I.detect_image(np.zeros((70, 70, 3), np.float32), detect, {"gain": 1.0},
                   {}, PATCH, 2, progress=False)
  with pytest.raises(ValueError, match="px"):
    I.detect_image(np.zeros((70, 70, 3), np.uint8), detect, {"gain": 1.0},
                   {}, 128, 2, progress=False)
  with pytest.raises(ValueError, match="windows"):
    detect({"gain": 1.0}, {}, np.zeros((2, 32, 32, 3), np.uint8))
