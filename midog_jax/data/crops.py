"""Host-side input work: crop windows out of decoded ROIs, nothing else.

For a patch with top-left (x0, y0) the host yields the C x C window with
top-left (x0 - m, y0 - m), m = (C - P) / 2 (`augment.margin`), so the patch
sits in its centre and rotation on the device sees real tissue. Where the
window leaves the image it is filled by half-sample symmetric reflection,
the convention `augment` uses beyond the crop. Objects are listed when their
centre lies in the window, hard negatives included, padded to a fixed count;
more objects than slots is an error, never a silent drop.

With a stain normalisation, each patch also carries its case's [4, 3]
params (`stain.py`), which the device applies to the crop.

Decoded ROIs come from a `roi_store.RoiCache`. `batches` can fill several windows of
batches at once in worker threads: NumPy releases the GIL while it copies
pixels, and each window is a pure function of the plan, so the batches are
the same bytes for any number of workers. This module imports neither
TensorFlow nor TFDS.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
from typing import Iterator, Mapping, Sequence

import numpy as np

from midog_jax.data import roi_store
from midog_jax.data import sampling


def _margin(patch_size: int, crop_size: int) -> int:
  extra = crop_size - patch_size
  if extra < 0 or extra % 2:
    raise ValueError(
        f"crop side {crop_size} does not centre a {patch_size} px patch")
  return extra // 2


def _reflect(start: int, length: int, n: int) -> np.ndarray | slice:
  """Indices [start, start + length) reflected into [0, n); a slice inside."""
  if start >= 0 and start + length <= n:
    return slice(start, start + length)
  i = np.mod(np.arange(start, start + length), 2 * n)
  return np.where(i < n, i, 2 * n - 1 - i)


def crop(image: np.ndarray, x0: int, y0: int, patch_size: int,
         crop_size: int, out: np.ndarray | None = None) -> np.ndarray:
  """The crop_size window centred on the patch with top-left (x0, y0).

  Args:
    image: uint8 [H, W, 3].
    x0, y0: patch top-left in image pixels.
    patch_size: patch side P.
    crop_size: window side C >= P, C - P even.
    out: optional [C, C, 3] buffer to write into (e.g. a batch slot).

  Returns:
    uint8 [C, C, 3]; pixels outside the image are reflected (half-sample
    symmetric), so images smaller than the window are padded too.
  """
  m = _margin(patch_size, crop_size)
  h, w = image.shape[:2]
  y, x = int(y0) - m, int(x0) - m
  # The part inside the image is a slice; only what lies outside is built,
  # by symmetric padding (the same half-sample reflection as `_reflect`).
  ys, ye = min(max(y, 0), h), min(max(y + crop_size, 0), h)
  xs, xe = min(max(x, 0), w), min(max(x + crop_size, 0), w)
  pads = ((ys - y, y + crop_size - ye), (xs - x, x + crop_size - xe))
  if pads == ((0, 0), (0, 0)):
    window = image[ys:ye, xs:xe]
  elif max(pads[0]) <= ye - ys and max(pads[1]) <= xe - xs:
    # Every reflected pixel lies inside the slice: pad it.
    window = np.pad(image[ys:ye, xs:xe], pads + ((0, 0),), mode="symmetric")
  else:  # Images smaller than the window: gather reflected indices.
    window = image[_reflect(y, crop_size, h)][:, _reflect(x, crop_size, w)]
  if out is None:
    return np.array(window, copy=True)
  out[...] = window
  return out


def objects_in_crop(
    centers: np.ndarray, labels: np.ndarray, x0: int, y0: int,
    patch_size: int, crop_size: int, max_objects: int,
    case_id: int | str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Objects whose centre lies in the window, in crop pixels, padded.

  Args:
    centers: [M, 2] (x, y) in image pixels.
    labels: [M], 1 mitotic, 2 non-mitotic; both are kept.
    x0, y0: patch top-left in image pixels.
    patch_size, crop_size: as for `crop`.
    max_objects: slots N.
    case_id: named in the overflow error.

  Returns:
    centers float32 [N, 2] in crop pixels, labels int32 [N] (0 in empty
    slots), valid bool [N]. Objects keep their input order.

  Raises:
    ValueError: more than `max_objects` objects fall in the window.
  """
  m = _margin(patch_size, crop_size)
  origin = np.array([int(x0) - m, int(y0) - m], np.float32)
  local = np.asarray(centers, np.float32).reshape(-1, 2) - origin
  inside = np.all((local >= 0) & (local < crop_size), axis=1)
  count = int(inside.sum())
  if count > max_objects:
    raise ValueError(
        f"case {case_id}: {count} objects in the {crop_size} px window at "
        f"patch ({x0}, {y0}), more than max_objects={max_objects}; raise "
        "max_objects (see max_objects_in_window)")
  out_centers = np.zeros((max_objects, 2), np.float32)
  out_labels = np.zeros((max_objects,), np.int32)
  valid = np.zeros((max_objects,), bool)
  out_centers[:count] = local[inside]
  out_labels[:count] = np.asarray(labels).reshape(-1)[inside]
  valid[:count] = True
  return out_centers, out_labels, valid


def _max_in_window(points: np.ndarray, window: float) -> int:
  """Most points in any half-open square [a, a + w) x [b, b + w)."""
  if len(points) == 0:
    return 0
  xs = points[:, 0]
  best = 0
  # An optimal square can be slid right/down until its left/top edge meets
  # a point without losing any, so left edges at the points' x suffice.
  for left in np.unique(xs):
    ys = np.sort(points[(xs >= left) & (xs < left + window), 1])
    if len(ys) <= best:
      continue
    # Points in [ys[i], ys[i] + w) for each candidate top edge ys[i].
    ends = np.searchsorted(ys, ys + window, side="left")
    best = max(best, int((ends - np.arange(len(ys))).max()))
  return best


def max_objects_in_window(cases: Sequence[sampling.SampledCase],
                          window: int) -> int:
  """The most objects (both labels) any window of side `window` can hold.

  Windows may sit anywhere, also partly outside the image, so this bounds
  what `objects_in_crop` can meet with crop_size = `window`.
  """
  return max((_max_in_window(c.centers, float(window)) for c in cases),
             default=0)


def fill(plan: sampling.Plan, cache: roi_store.RoiCache, crop_size: int,
         max_objects: int, out: dict[str, np.ndarray] | None = None,
         stain: Mapping[int, np.ndarray] | None = None) -> dict[str, np.ndarray]:
  """Crops and objects of every patch of `plan`, fetching each ROI once.

  Patches are filled case by case, so a streaming cache (budget 0) decodes
  each case once per call however its patches are spread over the plan.
  `out` reuses arrays of a previous call (at least len(plan) long): writing
  into freshly allocated memory costs about as much as the crop itself.
  `stain` maps case ids to their stain normalisation params.

  Returns:
    {"crops": uint8 [K, C, C, 3], "centers": float32 [K, N, 2] (x, y) in
    crop pixels, "labels": int32 [K, N], "valid": bool [K, N],
    "case_id": int64 [K]}, and with `stain` "stain": float32 [K, 4, 3].
  """
  k, p = len(plan), plan.patch_size
  if out is None or len(out["crops"]) < k:
    out = {
        "crops": np.empty((k, crop_size, crop_size, 3), np.uint8),
        "centers": np.empty((k, max_objects, 2), np.float32),
        "labels": np.empty((k, max_objects), np.int32),
        "valid": np.empty((k, max_objects), bool),
    }
  if stain is not None and len(out.get("stain", ())) < k:
    out["stain"] = np.empty((k, 4, 3), np.float32)
  out = {key: v[:k] for key, v in out.items() if key != "case_id"}
  out["case_id"] = plan.case_ids()
  for index in np.unique(plan.case_index):
    case = plan.cases[index]
    if stain is not None:
      out["stain"][plan.case_index == index] = stain[case.case_id]
    image = cache.get(case.case_id)
    for j in np.flatnonzero(plan.case_index == index):
      x0, y0 = int(plan.x0[j]), int(plan.y0[j])
      crop(image, x0, y0, p, crop_size, out=out["crops"][j])
      (out["centers"][j], out["labels"][j], out["valid"][j]) = objects_in_crop(
          case.centers, case.labels, x0, y0, p, crop_size, max_objects,
          case_id=case.case_id)
  return out


def default_workers() -> int:
  """Input threads when none are asked for: the cores this process may use,
  at most 8 (beyond that the copies are bound by memory bandwidth)."""
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    cores = os.cpu_count() or 1
  return max(1, min(cores, 8))


def batches(plan: sampling.Plan, cache: roi_store.RoiCache, batch_size: int,
            crop_size: int, max_objects: int, start: int = 0,
            drop_remainder: bool = True, window: int = 1,
            reuse_buffers: bool = False, workers: int = 1,
            stain: Mapping[int, np.ndarray] | None = None
            ) -> Iterator[dict[str, np.ndarray]]:
  """Host batches of `plan`, in plan order, from batch index `start` on.

  Args:
    plan: an epoch plan (or one host's shard of it).
    cache: where the ROIs come from, keyed by `SampledCase.case_id`.
    batch_size: patches per yielded batch.
    crop_size: window side C (`augment.crop_size(plan.patch_size)`).
    max_objects: object slots N per patch.
    start: first batch to yield; earlier ones are skipped without decoding,
      so a resumed run picks up exactly where it stopped.
    drop_remainder: drop a last, smaller batch.
    window: batches prepared together, each ROI fetched once per window;
      with a streaming cache this trades host RAM for fewer decodes.
    reuse_buffers: fill windows into the same arrays (workers + 1 sets of
      them circulate). A yielded batch is then valid only until the next
      one is requested: the consumer must copy it (e.g. to the
      accelerator) first.
    workers: threads filling the next windows while the current one is
      consumed; the batches are the same for any number. Streaming, up to
      `workers` ROIs are decoded at once.
    stain: case id -> stain normalisation params, put beside each patch.

  Yields:
    dicts as `fill` returns them, of `batch_size` patches.
  """
  if batch_size < 1 or window < 1 or workers < 1:
    raise ValueError(f"batch_size {batch_size}, window {window} and workers {workers} "
                     "must be positive")
  n = len(plan)
  stop = n - n % batch_size if drop_remainder else n
  span = batch_size * window
  spans = [(lo, min(lo + span, stop)) for lo in range(start * batch_size, stop, span)]

  def fill_span(lo_hi, out):
    return fill(plan.take(np.arange(*lo_hi)), cache, crop_size, max_objects, out=out,
                stain=stain)

  for filled in _in_order(fill_span, spans, workers, reuse_buffers):
    for b in range(0, len(filled["case_id"]), batch_size):
      yield {key: v[b:b + batch_size] for key, v in filled.items()}


def _in_order(fill_one, jobs, workers: int, reuse_buffers: bool) -> Iterator:
  """`fill_one(job, out)` of each job, in job order, `workers` jobs at once.

  A result is yielded once every earlier one was, and its buffers go back to
  the free list only when the next result is requested: reused arrays are
  never refilled while the consumer may still read them.
  """
  free = [None] * (workers + 1)  # None: `fill` allocates, later calls reuse.
  if workers == 1:  # No threads: the consumer's own thread fills.
    for job in jobs:
      filled = fill_one(job, free[-1])
      yield filled
      if reuse_buffers:
        free[-1] = filled
    return
  jobs = iter(jobs)
  pending: collections.deque = collections.deque()
  pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="patches")

  def submit():
    job = next(jobs, None)
    if job is not None:
      pending.append(pool.submit(fill_one, job, free.pop()))

  try:
    for _ in range(workers):
      submit()
    while pending:
      filled = pending.popleft().result()
      submit()  # Takes the one free buffer set: `workers` fill, one is read.
      yield filled
      free.append(filled if reuse_buffers else None)
  finally:  # Also when the consumer stops early: no thread outlives the batches.
    for f in pending:
      f.cancel()
    pool.shutdown(wait=True)
