"""The demo's stage clock: a reused stage keeps the time it took when it ran."""

from midog_jax.evaluation import end_to_end


def test_a_reused_stage_keeps_its_earlier_time_and_a_computed_one_is_measured(monkeypatch):
  now = iter([100.0, 107.5, 108.0, 108.0, 110.5])
  monkeypatch.setattr(end_to_end.time, "time", lambda: next(now))
  stages = end_to_end.Stages({"synthetic": 3.0, "build": 9.0})
  stages.start(1, "synthetic", "synthetic data")   # t = 100
  stages.reused("data/manual")
  stages.start(2, "build", "build")                # t = 107.5, computed again
  stages.start(3, "training", "training")          # t = 108: build took 0.5
  assert stages.close() == {"synthetic": 3.0, "build": 0.5, "training": 2.5}
