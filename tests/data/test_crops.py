import concurrent.futures
import threading
import time

import numpy as np
import pytest

from midog_jax.data import crops
from midog_jax.data import roi_store
from midog_jax.data import sampling
from tests.helpers import REAL_CSV, REAL_JSON, needs_real_files

P, C, M = 16, 24, 4  # Patch, crop, margin.


def _image(h, w):
  """Each pixel encodes its own coordinates."""
  y, x = np.mgrid[:h, :w]
  return np.stack([x % 256, y % 256, (x // 256) + 16 * (y // 256)],
                  -1).astype(np.uint8)


def test_crop_interior_window():
  img = _image(40, 50)
  out = crops.crop(img, 10, 12, P, C)
  assert out.shape == (C, C, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, img[12 - M:12 - M + C, 10 - M:10 - M + C])
  # The patch is the centre of the crop.
  np.testing.assert_array_equal(out[M:M + P, M:M + P], img[12:28, 10:26])
  out[:] = 0  # A copy, not a view of the ROI.
  assert img[12, 10, 0] == 10


@pytest.mark.parametrize("x0,y0", [(0, 0), (34, 24), (0, 24), (-3, 30)])
def test_crop_reflects_at_borders(x0, y0):
  img = _image(40, 50)
  pad = C
  padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="symmetric")
  want = padded[y0 - M + pad:y0 - M + pad + C, x0 - M + pad:x0 - M + pad + C]
  np.testing.assert_array_equal(crops.crop(img, x0, y0, P, C), want)
  if x0 == 0:
    # Half-sample symmetric: column -1 repeats column 0.
    got = crops.crop(img, x0, y0, P, C)
    np.testing.assert_array_equal(got[:, M - 1], got[:, M])
    np.testing.assert_array_equal(got[:, :M], got[:, 2 * M - 1:M - 1:-1])


def test_crop_pads_images_smaller_than_the_patch():
  img = _image(5, 7)
  got = crops.crop(img, 0, 0, P, C)
  assert got.shape == (C, C, 3)
  rows = [(i % 10) if i % 10 < 5 else 9 - i % 10 for i in range(-M, C - M)]
  cols = [(i % 14) if i % 14 < 7 else 13 - i % 14 for i in range(-M, C - M)]
  np.testing.assert_array_equal(got, img[np.ix_(rows, cols)])


def test_crop_into_buffer_and_bad_sizes():
  img = _image(40, 50)
  buf = np.zeros((2, C, C, 3), np.uint8)
  crops.crop(img, 5, 6, P, C, out=buf[1])
  np.testing.assert_array_equal(buf[1], crops.crop(img, 5, 6, P, C))
  assert not buf[0].any()
  with pytest.raises(ValueError, match="does not centre"):
    crops.crop(img, 0, 0, P, P + 3)


def test_objects_map_to_their_pixels():
  img = np.zeros((60, 70, 3), np.uint8)
  centers = np.array([[20.5, 30.5], [33.0, 17.0], [10.0, 35.0],
                      [5.0, 5.0], [44.0, 10.0]], np.float32)
  labels = np.array([1, 2, 1, 2, 1])
  for (x, y), lab in zip(centers, labels):
    img[int(y), int(x)] = (255, lab, 0)
  x0, y0 = 14, 16  # Window [10, 34) x [12, 36).
  crop = crops.crop(img, x0, y0, P, C)
  ctr, lab, valid = crops.objects_in_crop(centers, labels, x0, y0, P, C, 6)
  assert ctr.shape == (6, 2) and lab.shape == (6,) and valid.shape == (6,)
  assert ctr.dtype == np.float32 and lab.dtype == np.int32
  # Inside: the first three (x = 33 the last column, (10, 35) the first
  # column and last row); (5, 5) and (44, 10) lie outside.
  np.testing.assert_array_equal(valid, [1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(lab, [1, 2, 1, 0, 0, 0])
  np.testing.assert_allclose(ctr[:3], centers[:3] - [10, 12])
  assert not ctr[3:].any()
  for (x, y), l in zip(ctr[valid], lab[valid]):
    assert tuple(crop[int(y), int(x)]) == (255, l, 0)


def test_overflow_raises_naming_case_and_count():
  centers = np.full((5, 2), 20.0, np.float32)
  with pytest.raises(ValueError, match=r"case 77: 5 objects.*max_objects=4"):
    crops.objects_in_crop(centers, np.ones(5), 14, 16, P, C, 4, case_id=77)
  _, _, valid = crops.objects_in_crop(centers, np.ones(5), 14, 16, P, C, 5)
  assert valid.all()


def _brute_force(points, w):
  best = 0
  lo = points.min(0).astype(int) - w
  hi = points.max(0).astype(int) + 1
  for a in range(lo[0], hi[0] + 1):
    for b in range(lo[1], hi[1] + 1):
      best = max(best, int(np.all((points >= [a, b]) & (points < [a + w, b + w]),
                                  1).sum()))
  return best


def test_max_objects_in_window_matches_brute_force():
  rng = np.random.default_rng(0)
  for trial in range(15):
    n = int(rng.integers(0, 25))
    pts = rng.integers(0, 40, size=(n, 2)).astype(np.float32)
    case = sampling.SampledCase(trial, 40, 40, pts, np.ones(n))
    want = _brute_force(pts, 9) if n else 0
    assert crops.max_objects_in_window([case], 9) == want
  # Half-open: points w apart never share a window.
  case = sampling.SampledCase(0, 100, 100, [[0, 0], [10, 0]], [1, 2])
  assert crops.max_objects_in_window([case], 10) == 1
  assert crops.max_objects_in_window([case], 11) == 2


@needs_real_files
def test_real_annotations_bound():
  from midog_jax.data import annotations
  cases = [sampling.SampledCase.from_case(c)
           for c in annotations.load_cases(REAL_JSON, REAL_CSV)]
  # 19, not 18: case 290 holds 10 mitotic and 9 non-mitotic figures in the
  # crop of a patch the sampler can draw.
  assert crops.max_objects_in_window(cases, 724) == 19
  case = next(c for c in cases if c.case_id == 290)
  _, _, valid = crops.objects_in_crop(case.centers, case.labels, 1204,
                                        4032, 512, 724, 19)
  assert valid.sum() == 19
  assert 1204 <= case.width - 512 and 4032 <= case.height - 512
  with pytest.raises(ValueError, match="case 290: 19 objects"):
    crops.objects_in_crop(case.centers, case.labels, 1204, 4032, 512, 724,
                            18, case_id=290)


class _Loader:

  def __init__(self, shapes):
    self.shapes = shapes
    self.calls = []

  def __call__(self, case_id):
    self.calls.append(case_id)
    h, w = self.shapes[case_id]
    return (_image(h, w) + case_id).astype(np.uint8)


def test_roi_cache_evicts_lru_under_budget():
  loader = _Loader({i: (10, 10) for i in range(5)})  # 300 bytes each.
  cache = roi_store.RoiCache(loader, budget_bytes=700)
  for i in (0, 1, 2):
    cache.get(i)
    assert cache.nbytes <= 700
  assert len(cache) == 2 and 0 not in cache and cache.evictions == 1
  cache.get(1)  # Hit; 2 is now the least recently used.
  assert loader.calls == [0, 1, 2]
  cache.get(3)
  assert 2 not in cache and 1 in cache and 3 in cache
  assert cache.nbytes == 600 and cache.hits == 1 and cache.loads == 4
  kept = cache.get(3)
  assert not kept.flags.writeable
  np.testing.assert_array_equal(kept, loader(3))


def test_roi_cache_budget_zero_streams():
  loader = _Loader({0: (10, 10), 1: (20, 20)})
  cache = roi_store.RoiCache(loader, budget_bytes=0)
  for _ in range(3):
    assert cache.get(0).shape == (10, 10, 3)
  assert len(cache) == 0 and cache.nbytes == 0
  assert loader.calls == [0, 0, 0]
  # An ROI bigger than the budget is served but not kept.
  cache = roi_store.RoiCache(loader, budget_bytes=500)
  cache.get(1)
  cache.get(0)
  assert 1 not in cache and 0 in cache
  with pytest.raises(ValueError):
    roi_store.RoiCache(loader, budget_bytes=-1)


def test_batches():
  cases = [
      sampling.SampledCase(10, 60, 40, [[20, 20], [50, 30], [5, 35]],
                           [1, 2, 1]),
      sampling.SampledCase(11, 12, 30, [[6, 6]], [2]),
  ]
  shapes = {10: (40, 60), 11: (30, 12)}
  plan = sampling.epoch_plan(cases, 22, P, seed=3, epoch=1)  # 22 patches.
  cache = roi_store.RoiCache(_Loader(shapes), budget_bytes=1 << 20)
  got = list(crops.batches(plan, cache, 4, C, 5))
  assert len(got) == 5  # 22 // 4, tail dropped.
  for k, b in enumerate(got):
    assert b["crops"].shape == (4, C, C, 3) and b["crops"].dtype == np.uint8
    assert b["centers"].shape == (4, 5, 2) and b["centers"].dtype == np.float32
    assert b["labels"].shape == (4, 5) and b["labels"].dtype == np.int32
    assert b["valid"].shape == (4, 5) and b["valid"].dtype == bool
    for j in range(4):
      i = 4 * k + j
      case = plan.cases[plan.case_index[i]]
      assert b["case_id"][j] == case.case_id
      np.testing.assert_array_equal(
          b["crops"][j], crops.crop(cache.get(case.case_id), plan.x0[i],
                                      plan.y0[i], P, C))
      want = crops.objects_in_crop(case.centers, case.labels, plan.x0[i],
                                     plan.y0[i], P, C, 5)
      np.testing.assert_array_equal(b["centers"][j], want[0])
      np.testing.assert_array_equal(b["labels"][j], want[1])
      np.testing.assert_array_equal(b["valid"][j], want[2])
  assert cache.loads == 2
  # Streaming gives the same batches; a resume at batch 3 the same tail.
  loader = _Loader(shapes)
  stream = list(crops.batches(plan, roi_store.RoiCache(loader, 0), 4, C, 5))
  resumed = list(crops.batches(plan, roi_store.RoiCache(_Loader(shapes), 0),
                                 4, C, 5, start=3))
  # Each batch fetches each of its cases once.
  per_batch = sum(len(set(plan.case_index[4 * k:4 * k + 4])) for k in range(5))
  assert len(loader.calls) == per_batch < 20 and len(resumed) == 2
  # A window of all five batches decodes each case once per epoch.
  loader = _Loader(shapes)
  windowed = list(crops.batches(plan, roi_store.RoiCache(loader, 0), 4, C, 5, window=5))
  assert len(loader.calls) == 2
  for a, b in zip(got, windowed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  for a, b in zip(got, stream):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  for a, b in zip(got[3:], resumed):
    np.testing.assert_array_equal(a["crops"], b["crops"])
  tail = list(crops.batches(plan, cache, 4, C, 5, drop_remainder=False))
  assert len(tail) == 6 and len(tail[-1]["case_id"]) == 2


def test_reused_buffers_give_the_same_batches():
  cases = [sampling.SampledCase(i, 90, 70, [[20, 20], [50, 30]], [1, 2]) for i in range(3)]
  shapes = {i: (70, 90) for i in range(3)}
  plan = sampling.epoch_plan(cases, 30, P, seed=1, epoch=0)
  fresh = [{k: v.copy() for k, v in b.items()}
           for b in crops.batches(plan, roi_store.RoiCache(_Loader(shapes), 1 << 20), 4, C, 3)]
  reused, previous = [], None
  for b in crops.batches(plan, roi_store.RoiCache(_Loader(shapes), 1 << 20), 4, C, 3,
                           reuse_buffers=True):
    if previous is not None:  # The same memory, refilled.
      assert np.shares_memory(previous, b["crops"])
    previous = b["crops"]
    reused.append({k: v.copy() for k, v in b.items()})
  assert len(reused) == len(fresh) == 7
  for a, b in zip(fresh, reused):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_crop_border_padding_equals_reflected_indices():
  rng = np.random.default_rng(0)

  def indices(r):
    return np.arange(r.start, r.stop) if isinstance(r, slice) else r

  for h, w in ((50, 70), (7, 5), (300, 200), (64, 64), (65, 90)):
    img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    for _ in range(200):
      x0, y0 = int(rng.integers(-60, w + 40)), int(rng.integers(-60, h + 40))
      want = img[indices(crops._reflect(y0 - 16, 64, h))][
          :, indices(crops._reflect(x0 - 16, 64, w))]
      np.testing.assert_array_equal(crops.crop(img, x0, y0, 32, 64), want)


def _copies(it):
  return [{k: v.copy() for k, v in b.items()} for b in it]


@pytest.mark.parametrize("reuse", [False, True])
def test_workers_give_the_same_batches(reuse):
  cases = [sampling.SampledCase(i, 90, 70, [[20, 20], [50, 30], [80, 5]], [1, 2, 1])
           for i in range(5)]
  shapes = {i: (70, 90) for i in range(5)}
  plan = sampling.epoch_plan(cases, 46, P, seed=2, epoch=0)
  want = _copies(crops.batches(plan, roi_store.RoiCache(_Loader(shapes), 1 << 20), 4, C, 3))
  assert len(want) == 11
  for workers in (2, 3):
    for window, budget in ((1, 1 << 20), (2, 0)):
      got, owners = [], []
      for b in crops.batches(plan, roi_store.RoiCache(_Loader(shapes), budget), 4, C, 3,
                               window=window, reuse_buffers=reuse, workers=workers):
        time.sleep(0.002)  # A slow consumer: the workers fill ahead meanwhile.
        # Still intact while held: no worker refills the batch being read.
        np.testing.assert_array_equal(b["crops"], want[len(got)]["crops"])
        got.append({k: v.copy() for k, v in b.items()})
        if not any(b["crops"].base is o for o in owners):  # Arrays of a window.
          owners.append(b["crops"].base)
      assert len(got) == len(want)
      for a, b in zip(want, got):
        for key in a:
          np.testing.assert_array_equal(a[key], b[key])
      # Reused: `workers` windows being filled and one being read, no more.
      windows = -(-len(got) // window)
      assert len(owners) == (min(workers + 1, windows) if reuse else windows)
      resumed = _copies(crops.batches(plan, roi_store.RoiCache(_Loader(shapes), budget), 4,
                                        C, 3, start=5, window=window, workers=workers,
                                        reuse_buffers=reuse))
      for a, b in zip(want[5:], resumed, strict=True):
        np.testing.assert_array_equal(a["crops"], b["crops"])


def test_worker_errors_reach_the_consumer():
  cases = [sampling.SampledCase(i, 90, 70, [[20, 20]] * 4, [1] * 4) for i in range(3)]
  plan = sampling.epoch_plan(cases, 24, P, seed=0, epoch=0)
  loader = _Loader({i: (70, 90) for i in range(3)})
  with pytest.raises(ValueError, match="more than max_objects=3"):
    list(crops.batches(plan, roi_store.RoiCache(loader, 1 << 20), 4, C, 3, workers=2))


def test_roi_cache_decodes_once_for_concurrent_misses():
  release, calls = threading.Event(), []

  def loader(case_id):
    calls.append(case_id)
    release.wait(10)
    if case_id == 1:
      raise OSError("unreadable")
    return _image(10, 10)

  for budget in (0, 1 << 20):
    cache, calls[:] = roi_store.RoiCache(loader, budget), []
    release.clear()
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
      got = [pool.submit(cache.get, 0) for _ in range(4)]
      bad = [pool.submit(cache.get, 1) for _ in range(2)]
      deadline = time.monotonic() + 10
      while cache.hits < 4 and time.monotonic() < deadline:  # All waiting on 2 decodes.
        time.sleep(0.001)
      release.set()
      images = [f.result() for f in got]
      for f in bad:
        with pytest.raises(OSError, match="unreadable"):
          f.result()
    assert sorted(calls) == [0, 1] and cache.loads == 1
    assert all(im is images[0] and not im.flags.writeable for im in images)
    with pytest.raises(OSError):  # A failed decode is not remembered: tried again.
      cache.get(1)
    assert calls.count(1) == 2
