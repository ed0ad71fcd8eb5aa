"""Sliding-window detection over whole images: the jitted window detector.

The work splits into host and device parts so they can be timed apart:

* host: `window_origins` and `crop_windows` cut uint8 windows out of an image;
* device: the jitted function from `make_detector` normalises the windows,
  runs the network, decodes boxes, applies the score threshold and a
  fixed-size per-window non-maximum suppression (IoU 0.4);
* host: `to_image_coordinates` and `suppress_by_distance` map the per-window
  centres into the image and keep the best detection within 25 px.

Coordinates: a detection is the centre (x, y) of its box in pixels, in the
same frame as the annotations the network was trained on; image coordinates
are window coordinates plus the window's origin (x0, y0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from scipy.spatial import cKDTree

from midog_jax import sharding
from midog_jax.data.normalization import Normalization
from midog_jax.model import boxes as box_lib
from midog_jax.model import retinanet

# Padding for images smaller than a window: white, the colour of glass
# around tissue, so the network sees an ordinary slide margin. Reflection
# would mirror mitotic figures into the padding and a mean colour is not a
# colour any training patch contained.
PAD_VALUE = 255
DISTANCE_RADIUS = 25.0  # Whole-image suppression radius, pixels.
NMS_IOU = 0.4
MIN_OVERLAP = 50  # px: one annotation box.

# forward(params, batch_stats, images) -> (logits [B, A, C], deltas [B, A, 4],
# anchors [A, 4] as (cy, cx, h, w) in [-1, 1]); traced inside the detector.
Forward = Callable[[Any, Any, jax.Array], tuple[jax.Array, jax.Array, Any]]
Detections = tuple[jax.Array, jax.Array, jax.Array]


def _axis_origins(size: int, patch: int, stride: int) -> list[int]:
  if size <= patch:
    return [0]
  starts = list(range(0, size - patch, stride))
  return starts + [size - patch]  # The last window ends at the border.


def window_origins(width: int, height: int, patch: int,
                   overlap: float = 0.1, min_overlap: int = MIN_OVERLAP) -> np.ndarray:
  """Top-left corners (x0, y0) of the windows covering an image, [N, 2].

  The stride is int(patch * (1 - overlap)), 460 at 512 px with 10 %
  overlap, but at most patch - min_overlap: below the reference's 512 px
  the overlap stays at least one box (50 px), so a figure on a window edge
  is whole in a neighbouring window. The last window of each axis is moved
  back to end exactly at the border. An axis shorter than a window gets one window at 0, which
  `crop_windows` pads. Order: row-major (y outer, x inner).
  """
  stride = min(int(patch * (1 - overlap)), patch - min_overlap)
  if patch <= 0 or stride <= 0:
    raise ValueError(f"bad patch {patch} or overlap {overlap}")
  if width <= 0 or height <= 0:
    raise ValueError(f"empty image {width}x{height}")
  xs, ys = (_axis_origins(width, patch, stride),
            _axis_origins(height, patch, stride))
  return np.array([(x, y) for y in ys for x in xs], np.int64).reshape(-1, 2)


def crop_windows(image: np.ndarray, origins: np.ndarray, patch: int,
                 batch_size: int | None = None,
                 pad_value: int = PAD_VALUE) -> np.ndarray:
  """uint8 windows [batch_size or N, patch, patch, 3] at `origins`.

  Parts outside the image and the extra windows up to `batch_size` (kept
  fixed so the detector compiles once) are filled with `pad_value`.
  """
  n = len(origins) if batch_size is None else batch_size
  if len(origins) > n:
    raise ValueError(f"{len(origins)} windows do not fit a batch of {n}")
  out = np.full((n, patch, patch, 3), pad_value, np.uint8)
  h, w = image.shape[:2]
  for i, (x0, y0) in enumerate(origins):
    crop = image[y0:min(y0 + patch, h), x0:min(x0 + patch, w)]
    out[i, :crop.shape[0], :crop.shape[1]] = crop
  return out


def nms(boxes_xyxy: jax.Array, scores: jax.Array, valid: jax.Array,
        iou_threshold: float, max_out: int) -> tuple[jax.Array, jax.Array]:
  """Greedy non-maximum suppression with fixed output size.

  Repeatedly keeps the highest-scoring remaining valid box (the lower index
  on ties) and drops every remaining box whose IoU with it is strictly above
  `iou_threshold`, for at most `max_out` rounds. Returns indices into the
  inputs [max_out] in the order kept (descending score) and a mask [max_out]
  of which entries are real; the rest are index 0 and False. Jits and vmaps.
  """
  n = scores.shape[0]
  if n < max_out:  # Pad with invalid boxes so the output shape is fixed.
    pad = max_out - n
    boxes_xyxy = jnp.pad(boxes_xyxy, ((0, pad), (0, 0)))
    scores = jnp.pad(scores, (0, pad))
    valid = jnp.pad(valid, (0, pad))
  x1, y1, x2, y2 = jnp.moveaxis(boxes_xyxy, -1, 0)
  areas = jnp.maximum(x2 - x1, 0) * jnp.maximum(y2 - y1, 0)
  arange = jnp.arange(scores.shape[0])

  def cond(state):
    i, alive, _, _ = state
    return (i < max_out) & jnp.any(alive)

  def body(state):
    i, alive, kept, kept_valid = state
    best = jnp.argmax(jnp.where(alive, scores, -jnp.inf))
    iw = jnp.maximum(jnp.minimum(x2, x2[best]) - jnp.maximum(x1, x1[best]), 0)
    ih = jnp.maximum(jnp.minimum(y2, y2[best]) - jnp.maximum(y1, y1[best]), 0)
    inter = iw * ih
    union = areas + areas[best] - inter
    overlap = inter / jnp.maximum(union, 1e-12)
    alive = alive & (overlap <= iou_threshold) & (arange != best)
    return (i + 1, alive, kept.at[i].set(best.astype(jnp.int32)),
            kept_valid.at[i].set(True))

  init = (jnp.int32(0), valid.astype(bool), jnp.zeros(max_out, jnp.int32),
          jnp.zeros(max_out, bool))
  _, _, kept, kept_valid = jax.lax.while_loop(cond, body, init)
  return kept, kept_valid


class WindowDetector:
  """Calls the jitted detection function with a default threshold.

  `jitted(params, batch_stats, threshold, windows)` is the device part
  alone, for timing.
  """

  def __init__(self, jitted: Callable[..., Detections], patch: int,
               score_threshold: float, mesh: Mesh | None):
    self.jitted = jitted
    self.patch = patch
    self.score_threshold = score_threshold
    self.mesh = mesh

  def __call__(self, params: Any, batch_stats: Any,
               windows: jax.Array | np.ndarray,
               threshold: float | None = None) -> Detections:
    """(centres_xy [B, K, 2] window px, scores [B, K], valid [B, K])."""
    p = self.patch
    if windows.ndim != 4 or windows.shape[1:] != (p, p, 3):
      raise ValueError(f"expected [B, {p}, {p}, 3] windows, got "
                       f"{windows.shape}")
    if self.mesh is not None and windows.shape[0] % self.mesh.size:
      raise ValueError(f"batch {windows.shape[0]} is not a multiple of the "
                       f"{self.mesh.size} devices of the mesh")
    t = self.score_threshold if threshold is None else threshold
    # A traced threshold: a new value does not recompile.
    return self.jitted(params, batch_stats, jnp.float32(t), windows)


def window_detections(forward: Forward, patch: int, max_detections_per_window: int,
                      nms_iou: float = NMS_IOU, pre_nms_top_k: int = 1000) -> Callable[..., Detections]:
  """The traceable device part: `detect(params, batch_stats, mean, std,
  threshold, windows_uint8)` -> (centres, scores, valid), `mean`/`std` the
  per-channel normalisation on the 0..1 scale. Unjitted, so that an ensemble
  can `vmap` it over its members' weights and normalisations."""
  k_out = max_detections_per_window

  def detect(params, batch_stats, mean, std, threshold, windows):
    images = (windows.astype(jnp.float32) / 255.0 - mean) / std
    logits, deltas, anchors = forward(params, batch_stats, images)
    scores = retinanet.scores(logits)
    xyxy = box_lib.cthw_to_xyxy(box_lib.decode(deltas, jnp.asarray(anchors)),
                                (patch, patch))
    # Threshold first, then suppression, as in the reference.
    masked = jnp.where(scores > threshold, scores, -jnp.inf)
    top_scores, top = jax.lax.top_k(masked, min(pre_nms_top_k,
                                                scores.shape[1]))
    top_boxes = jnp.take_along_axis(xyxy, top[..., None], axis=1)
    kept, valid = jax.vmap(nms, in_axes=(0, 0, 0, None, None))(
        top_boxes, top_scores, top_scores > -jnp.inf, nms_iou, k_out)
    boxes = jnp.take_along_axis(top_boxes, kept[..., None], axis=1)
    centres = (boxes[..., :2] + boxes[..., 2:]) / 2
    kept_scores = jnp.take_along_axis(top_scores, kept, axis=1)
    return (jnp.where(valid[..., None], centres, 0.0),
            jnp.where(valid, kept_scores, 0.0), valid)

  return detect


def make_window_detector(forward: Forward, normalization: Normalization,
                         patch: int, max_detections_per_window: int,
                         score_threshold: float, nms_iou: float = NMS_IOU,
                         pre_nms_top_k: int = 1000, mesh: Mesh | None = None
                         ) -> WindowDetector:
  """`make_detector` over any traceable `forward` (see `Forward`).

  `pre_nms_top_k` caps the candidates the suppression loop scans; the
  greedy result is unchanged unless more boxes than that pass the threshold.
  """
  mean = jnp.asarray(normalization.unit_mean)
  std = jnp.asarray(normalization.unit_std)
  inner = window_detections(forward, patch, max_detections_per_window, nms_iou, pre_nms_top_k)

  def detect(params, batch_stats, threshold, windows):
    return inner(params, batch_stats, mean, std, threshold, windows)

  if mesh is None:
    jitted = jax.jit(detect)
  else:
    rep, dat = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    jitted = jax.jit(detect, in_shardings=(rep, rep, rep, dat),
                     out_shardings=(dat, dat, dat))

  return WindowDetector(jitted, patch, score_threshold, mesh)


def network_forward(graphdef: nnx.GraphDef) -> Forward:
  """The RetinaNet of `graphdef` as a `Forward` (eval-mode BatchNorm)."""

  def forward(params, batch_stats, images):
    model = nnx.merge(graphdef, params, batch_stats)
    logits, deltas = model(images, train=False)
    return logits, deltas, model.anchors(images.shape[1:3])

  return forward


def make_detector(graphdef: nnx.GraphDef, normalization: Normalization,
                  patch: int, max_detections_per_window: int,
                  score_threshold: float, nms_iou: float = NMS_IOU,
                  mesh: Mesh | None = None, pre_nms_top_k: int = 1000
                  ) -> WindowDetector:
  """A jitted `detect(params, batch_stats, windows_uint8 [B, P, P, 3],
  threshold=score_threshold)`.

  Returns centres (x, y) [B, K, 2] in window pixels, scores [B, K] and a
  validity mask [B, K], K = `max_detections_per_window`, kept detections
  first in descending score. A detection needs a score strictly above the
  threshold. With a mesh the batch is sharded over its 'data' axis and must
  be a multiple of the number of devices.
  """

  return make_window_detector(network_forward(graphdef), normalization, patch,
                              max_detections_per_window, score_threshold,
                              nms_iou, pre_nms_top_k, mesh)


def to_image_coordinates(origins: np.ndarray, centres: np.ndarray,
                         scores: np.ndarray, valid: np.ndarray,
                         image_hw: tuple[int, int]
                         ) -> tuple[np.ndarray, np.ndarray]:
  """Valid per-window detections as image (x, y) [D, 2] and scores [D].

  Detections whose centre falls in the padding (outside the image) are
  dropped.
  """
  xy = np.asarray(centres, np.float64) + np.asarray(origins)[:, None, :]
  h, w = image_hw
  inside = ((xy[..., 0] >= 0) & (xy[..., 0] < w) & (xy[..., 1] >= 0)
            & (xy[..., 1] < h))
  keep = np.asarray(valid, bool) & inside
  return xy[keep], np.asarray(scores, np.float64)[keep]


def suppress_by_distance(xy: np.ndarray, scores: np.ndarray,
                         radius: float = DISTANCE_RADIUS) -> np.ndarray:
  """Indices kept by greedy suppression by distance, in descending score.

  Visits detections by descending score (the lower index first on ties);
  each one not yet dropped is kept and drops every other detection at a
  distance <= `radius` (a distance equal to the radius counts as within).
  """
  xy = np.asarray(xy, np.float64).reshape(-1, 2)
  scores = np.asarray(scores, np.float64).reshape(-1)
  if len(xy) != len(scores):
    raise ValueError(f"{len(xy)} points but {len(scores)} scores")
  order = np.argsort(-scores, kind="stable")
  if len(xy) < 2:
    return order
  pairs = cKDTree(xy).query_pairs(radius, output_type="ndarray")
  neighbours: list[list[int]] = [[] for _ in range(len(xy))]
  for a, b in pairs:
    neighbours[a].append(b)
    neighbours[b].append(a)
  dropped = np.zeros(len(xy), bool)
  kept = []
  for i in order:
    if not dropped[i]:
      kept.append(i)
      dropped[neighbours[i]] = True
  return np.asarray(kept, np.int64)


def detect_image(image: np.ndarray, detect_fn: Callable[..., Detections],
                 params: Any, batch_stats: Any, patch: int, batch_size: int,
                 *, overlap: float = 0.1, min_overlap: int = MIN_OVERLAP,
                 threshold: float | None = None,
                 radius: float = DISTANCE_RADIUS, pad_value: int = PAD_VALUE,
                 progress: bool = True
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Detections on a whole uint8 RGB image [H, W, 3].

  Returns image (x, y) [D, 2] and scores [D], in descending score, after
  whole-image suppression by distance. Every batch has `batch_size` windows
  (the last one padded) so `detect_fn` compiles once.
  """
  if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
    raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} "
                     f"{image.shape}")
  if getattr(detect_fn, "patch", patch) != patch:
    raise ValueError(f"detector built for {detect_fn.patch} px, not {patch}")
  h, w = image.shape[:2]
  origins = window_origins(w, h, patch, overlap, min_overlap)
  kwargs = {} if threshold is None else {"threshold": threshold}
  outputs = []
  # Imported here: the model-step benchmarks run where tqdm may be absent.
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  with tqdm(total=len(origins), unit="window", disable=not progress,
            leave=False) as bar:
    for start in range(0, len(origins), batch_size):
      chunk = origins[start:start + batch_size]
      windows = crop_windows(image, chunk, patch, batch_size, pad_value)
      # Dispatch is asynchronous: cropping the next batch overlaps this one.
      outputs.append(detect_fn(params, batch_stats, windows, **kwargs))
      bar.update(len(chunk))
  centres, scores, valid = (
      np.concatenate([np.asarray(o[j]) for o in outputs])[:len(origins)]
      for j in range(3))
  xy, scores = to_image_coordinates(origins, centres, scores, valid, (h, w))
  keep = suppress_by_distance(xy, scores, radius)
  return xy[keep], scores[keep]
