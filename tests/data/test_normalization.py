import dataclasses

import numpy as np
import pytest

from midog_jax.data import normalization
from midog_jax.data import stain


def test_pooled_equals_stats_over_all_pixels(tmp_path):
  rng = np.random.default_rng(0)
  images = [rng.normal(rng.uniform(100, 200, 3), rng.uniform(5, 40, 3), (n, 3))
            for n in (500, 2000, 37)]
  stats = normalization.tissue_weighted(
      [x.mean(0) for x in images], [x.std(0) for x in images], [len(x) for x in images])
  everything = np.concatenate(images)
  np.testing.assert_allclose(stats.mean, everything.mean(0), rtol=1e-10)
  np.testing.assert_allclose(stats.std, everything.std(0), rtol=1e-8)
  np.testing.assert_allclose(stats.unit_mean, everything.mean(0) / 255, rtol=1e-6)
  stats.save(tmp_path / "n.json")
  assert normalization.Normalization.load(tmp_path / "n.json") == stats


def test_errors():
  with pytest.raises(ValueError, match="no tissue"):
    normalization.tissue_weighted([[1, 2, 3]], [[1, 1, 1]], [0])
  with pytest.raises(ValueError, match="expected"):
    normalization.tissue_weighted([[1, 2]], [[1, 1]], [1])


def test_a_stain_switch_rides_along_but_stays_out_of_normalization_json(tmp_path):
  plain = normalization.Normalization((200.0, 150.0, 190.0), (30.0, 40.0, 30.0))
  with_stain = dataclasses.replace(plain, stain=stain.RunStain("reinhard", {
      "mean": [70.0, 20.0, -10.0], "std": [10.0, 5.0, 5.0]}))
  assert with_stain.to_json() == plain.to_json() == {"mean": [200.0, 150.0, 190.0],
                                                     "std": [30.0, 40.0, 30.0]}
  with_stain.save(tmp_path / "n.json")
  loaded = normalization.Normalization.load(tmp_path / "n.json")
  assert loaded == plain and loaded.stain is None and with_stain != plain
