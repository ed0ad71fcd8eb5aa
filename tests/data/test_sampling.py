import subprocess
import sys

import numpy as np
import pytest

from midog_jax.data import annotations
from midog_jax.data import sampling
from tests.helpers import ROOT, env_without_accelerators

P = 512
MARGIN = 106  # augment.margin(512); kept literal so this file needs no JAX.


def _case(case_id=0, width=5000, height=4000, n_mitotic=30, n_other=10,
          seed=0):
  rng = np.random.default_rng(seed)
  centers = np.concatenate([
      rng.uniform([0, 0], [width, height], size=(n_mitotic + n_other, 2)),
      # Figures at the borders exercise the clipping.
      np.array([[3.0, 10.0], [width - 2.0, height - 7.0]])[:min(n_mitotic, 2)],
  ]).astype(np.float32)
  labels = np.array([1] * n_mitotic + [2] * n_other + [1] * min(n_mitotic, 2))
  return sampling.SampledCase(case_id, width, height, centers, labels)


def test_guided_fraction_is_binomial_half():
  case = _case()
  for seed in range(3):
    plan = sampling.epoch_plan([case], 4000, P, seed=seed, epoch=0)
    assert len(plan) == 4000
    k = int(plan.is_guided.sum())
    # 4.5 standard deviations of Binomial(4000, 1/2).
    assert abs(k - 2000) < 4.5 * np.sqrt(4000 * 0.25), k
    assert np.all(plan.figure[~plan.is_guided] == -1)
    assert np.all(plan.figure[plan.is_guided] >= 0)


def test_guided_patches_contain_their_figure():
  # The reference subtracts an offset in [0, P] (Python's randint(0, 512)
  # includes 512) from the box's top-left corner, so that corner (clamped to
  # the image) lies in the patch or on its far edge; the box centre can fall
  # up to 25 px past the right or bottom edge, but always stays in the host
  # crop.
  case = _case()
  plan = sampling.epoch_plan([case], 6000, P, seed=1, epoch=3)
  g = plan.is_guided
  fig = case.mitotic_centers[plan.figure[g]]
  x0, y0 = plan.x0[g], plan.y0[g]
  corner_x = np.clip(fig[:, 0] - 25, 0, case.width - 1)
  corner_y = np.clip(fig[:, 1] - 25, 0, case.height - 1)
  assert np.all((x0 <= corner_x) & (corner_x < x0 + P + 1))  # int() truncates.
  assert np.all((y0 <= corner_y) & (corner_y < y0 + P + 1))
  assert np.all((x0 - MARGIN <= fig[:, 0]) & (fig[:, 0] < x0 + P + MARGIN))
  assert np.all((y0 - MARGIN <= fig[:, 1]) & (fig[:, 1] < y0 + P + MARGIN))
  centre_in = ((fig[:, 0] >= x0) & (fig[:, 0] < x0 + P)
               & (fig[:, 1] >= y0) & (fig[:, 1] < y0 + P))
  # ~1 - (488/513)^2 = 9.5 % have the centre outside: offsets reach P.
  assert 0.05 < 1 - centre_in.mean() < 0.15
  # Offsets are uniform over [0, P] where no clipping happens.
  free = ((fig[:, 0] - 25 - P > 0)
          & (fig[:, 0] - 25 < case.width - P))
  off = (fig[free, 0] - 25 - x0[free]).astype(int)
  assert off.min() == 0 and off.max() == P
  assert abs(off.mean() - (P - 1) / 2) < 15
  # Every figure gets picked.
  assert len(np.unique(plan.figure[g])) == len(case.mitotic_centers)


def test_random_patches_are_uniform_and_inside():
  case = _case()
  plan = sampling.epoch_plan([case], 4000, P, seed=2, epoch=0)
  r = ~plan.is_guided
  for v, hi in ((plan.x0[r], case.width - P), (plan.y0[r], case.height - P)):
    assert v.min() >= 0 and v.max() <= hi
    assert abs(v.mean() - hi / 2) < 0.05 * hi
  assert np.all((plan.x0 >= 0) & (plan.x0 <= case.width - P))
  assert np.all((plan.y0 >= 0) & (plan.y0 <= case.height - P))


def test_cases_without_mitoses_get_random_patches_only():
  empty = _case(case_id=1, n_mitotic=0, n_other=20)
  assert len(empty.mitotic_centers) == 0
  plan = sampling.epoch_plan([empty, _case(case_id=2)], 2000, P, seed=0,
                             epoch=0)
  mine = plan.case_index == 0
  assert mine.sum() == 1000
  assert not plan.is_guided[mine].any()
  assert np.all(plan.figure[mine] == -1)
  assert plan.is_guided[~mine].sum() > 400


def test_patches_per_case_and_fraction_config():
  cases = [_case(case_id=i, seed=i) for i in range(7)]
  plan = sampling.epoch_plan(cases, 100, P, seed=0, epoch=0)
  assert len(plan) == 98
  assert np.all(np.bincount(plan.case_index, minlength=7) == 14)
  assert sorted(set(plan.case_ids().tolist())) == list(range(7))
  # Shuffled, not grouped by case.
  assert np.any(np.diff(plan.case_index) < 0)
  assert sampling.epoch_plan(cases, 100, P, 0, 0, guided_fraction=1.0
                             ).is_guided.all()
  assert not sampling.epoch_plan(cases, 100, P, 0, 0, guided_fraction=0.0
                                 ).is_guided.any()


def test_image_smaller_than_patch():
  small = sampling.SampledCase(5, 300, 200, [[100, 50], [10, 190]], [1, 2])
  plan = sampling.epoch_plan([small], 50, P, seed=0, epoch=0)
  assert np.all(plan.x0 == 0) and np.all(plan.y0 == 0)
  assert plan.is_guided.any()


def test_errors():
  with pytest.raises(ValueError, match="no cases"):
    sampling.epoch_plan([], 10, P, 0, 0)
  with pytest.raises(ValueError, match="none per case"):
    sampling.epoch_plan([_case(i) for i in range(3)], 2, P, 0, 0)
  with pytest.raises(ValueError, match="guided_fraction"):
    sampling.epoch_plan([_case()], 10, P, 0, 0, guided_fraction=1.5)
  with pytest.raises(ValueError, match="centres"):
    sampling.SampledCase(0, 10, 10, np.zeros((2, 2)), [1])


def _same(a, b):
  return all(np.array_equal(getattr(a, f), getattr(b, f))
             for f in ("case_index", "x0", "y0", "is_guided", "figure"))


def test_determinism():
  cases = [_case(case_id=i, seed=i) for i in range(4)]
  a = sampling.epoch_plan(cases, 400, P, seed=7, epoch=5)
  b = sampling.epoch_plan(list(cases), 400, P, seed=7, epoch=5)
  assert _same(a, b)
  assert not _same(a, sampling.epoch_plan(cases, 400, P, seed=7, epoch=6))
  assert not _same(a, sampling.epoch_plan(cases, 400, P, seed=8, epoch=5))
  v1 = sampling.validation_plan(cases, 100, P, seed=7)
  v2 = sampling.validation_plan(cases, 100, P, seed=7)
  assert _same(v1, v2)
  assert not _same(v1, sampling.epoch_plan(cases, 100, P, seed=7, epoch=0))
  assert not _same(v1, sampling.validation_plan(cases, 100, P, seed=8))


def test_host_shard_splits_cases_between_hosts():
  cases = [_case(case_id=i, seed=i) for i in range(5)]
  plan = sampling.epoch_plan(cases, 103, P, seed=0, epoch=0)  # 100 patches.
  keys = {tuple(k) for k in np.stack([plan.case_index, plan.x0, plan.y0], 1)}
  for n in (1, 2, 4):
    shards = [sampling.host_shard(plan, h, n) for h in range(n)]
    assert len({len(s) for s in shards}) == 1  # Lockstep.
    assert len(shards[0]) >= len(plan) // n - 20  # At most one case's patches lost.
    owned = [set(s.case_index.tolist()) for s in shards]
    for h in range(n):  # Each host reads only its own cases.
      assert owned[h] <= {c for c in range(5) if c % n == h}
      got = {tuple(k) for k in np.stack([shards[h].case_index, shards[h].x0, shards[h].y0], 1)}
      assert got <= keys
  assert len(sampling.host_shard(plan, 0, 1)) == len(plan)
  with pytest.raises(ValueError):
    sampling.host_shard(plan, 2, 2)
  with pytest.raises(ValueError, match="cannot be shared"):
    sampling.host_shard(plan, 0, 6)


def test_from_case():
  obj = annotations.MidogObject
  case = annotations.Case(
      id=12, file_name="012.tiff", width=900, height=800,
      tumor="human_breast_carcinoma", domain="1a", split="train",
      um_per_px=0.23,
      objects=(obj(1, 100.0, 200.0, 1, (1, 1, 1)),
               obj(2, 300.5, 400.0, 2, (2, 2, 1))))
  sc = sampling.SampledCase.from_case(case)
  assert sc.case_id == 12 and (sc.width, sc.height) == (900, 800)
  np.testing.assert_array_equal(sc.centers, [[100, 200], [300.5, 400]])
  np.testing.assert_array_equal(sc.labels, [1, 2])
  np.testing.assert_array_equal(sc.mitotic_centers, [[100, 200]])
  assert sc.centers.dtype == np.float32


def test_no_tensorflow_import():
  code = ("import sys, midog_jax.data.sampling, midog_jax.data.crops; "
          "bad = [m for m in ('tensorflow', 'tensorflow_datasets') "
          "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                          env=env_without_accelerators(),
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stdout + result.stderr
