"""Training: data parallelism, divergence, learning (interruptions: test_crash_safety)."""

import json
import pathlib

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from midog_jax import sharding
from midog_jax.data import normalization
from midog_jax.model import retinanet as model_lib
from midog_jax.training import checkpoints
from midog_jax.training import inputs
from midog_jax.training import selection
from midog_jax.training import steps
from midog_jax.training import trainer
from tests.train_fixtures import tiny_config


@pytest.fixture(scope="module")
def data_dir(synthetic_data_dir):
  return synthetic_data_dir


def _params(workdir):
  root = pathlib.Path(workdir) / "checkpoints"
  step = max(int(p.name) for p in root.iterdir() if p.name.isdigit())
  with ocp.CheckpointManager(root) as mngr:
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return step, jax.tree.map(np.asarray, out.state)


def test_same_update_on_1_and_8_devices(data_dir):
  config = tiny_config(data_dir)
  data = inputs.build(config, mesh=sharding.make_mesh(jax.devices()[:1]))
  batch = next(data.train.host_batches(0))
  results = []
  for n in (1, 8):
    mesh = sharding.make_mesh(jax.devices()[:n])
    model = model_lib.build_model(model_lib.RetinaNetConfig.from_config(config), seed=0)
    tx = optax.adamw(1e-3)
    graphdef, state = steps.init_train_state(model, tx)
    state = sharding.replicate(state, mesh)
    step = steps.make_batch_train_step(graphdef, tx, config, data.normalization, mesh)
    state, metrics = step(state, sharding.shard_batch(batch, mesh), jax.random.key(3))
    results.append((jax.device_get(state.params), jax.device_get(state.batch_stats),
                    float(metrics["loss"])))
  (p1, s1, l1), (p8, s8, l8) = results
  # Same math; only the order of float32 reductions differs across devices.
  assert l1 == pytest.approx(l8, rel=1e-5)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s8)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _one_device():
  return sharding.make_mesh(jax.devices()[:1])


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
  config = tiny_config(data_dir, num_epochs=2)
  mesh = _one_device()
  data = inputs.build(config, mesh)
  trainer.train(config, str(tmp_path), data, mesh)  # A good run to the end.
  good_step, good = _params(tmp_path)
  # The next start resumes: weights come from the checkpoint, none are initialised.
  monkeypatch.setattr(model_lib, "build_model", lambda *a, **k: pytest.fail("initialised"))
  config.num_epochs = 4
  config.resume_anyway = True  # Another schedule and normalisation on purpose.
  # Zero std makes the inputs infinite: the loss cannot stay finite.
  data.normalization = normalization.Normalization((128.0,) * 3, (0.0,) * 3)
  with pytest.raises(trainer.TrainingDiverged, match="not finite.*last good checkpoint"):
    trainer.train(config, str(tmp_path), data, mesh)
  step, params = _params(tmp_path)
  assert step == good_step
  for x, y in zip(jax.tree.leaves(good), jax.tree.leaves(params)):
    np.testing.assert_array_equal(x, y)


def test_demo_config_learns(data_dir, tmp_path):
  config = tiny_config(data_dir, num_epochs=5, patch_size=128, train_patches_per_epoch=64,
                       **{"eval.every_epochs": 5})
  mesh = _one_device()
  data = inputs.build(config, mesh)
  model = model_lib.build_model(model_lib.RetinaNetConfig.from_config(config), seed=config.seed)
  graphdef, state = steps.init_train_state(model, optax.identity())
  untrained = selection.measured(
      data.validation_ap(graphdef, sharding.replicate(state, mesh))).value
  summary = trainer.train(config, str(tmp_path), data, mesh).summary
  assert summary["status"] == "finished"
  assert summary["final"]["valid_ap"] > untrained + 0.1
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5]
  assert records[-1]["train_loss"] < records[0]["train_loss"]
  assert (tmp_path / "tensorboard").is_dir() and any((tmp_path / "tensorboard").iterdir())
  for name in ("config.json", "normalization.json", "cases.json", "summary.json"):
    assert (tmp_path / name).exists()
  ckpt = checkpoints.RunCheckpoints(str(tmp_path), read_only=True)
  best = ckpt.best_step()
  assert best is not None and ckpt.meta(best)["valid_ap"] == summary["best_valid_ap"] == max(
      r["valid_ap"] for r in records if "valid_ap" in r)
  assert summary["best_step"] == best


@pytest.mark.parametrize("margin_targets", [False, True])
def test_targets_are_figures_centred_in_the_patch_unless_asked(margin_targets):
  from midog_jax.data import annotations
  from midog_jax.data import augment
  patch = 64
  crop = augment.crop_size(patch)
  m = (crop - patch) / 2
  batch = {"crops": np.full((1, crop, crop, 3), 128, np.uint8),
           "centers": np.array([[[m - 5, m + 30], [m + 30, m + 30], [m + 30, m + patch + 3]]],
                               np.float32),
           "valid": np.array([[True, True, True]]),
           "labels": np.full((1, 3), annotations.MITOTIC_FIGURE)}
  norm = normalization.Normalization((128.0,) * 3, (50.0,) * 3)
  aug = augment.AugmentConfig.from_config(tiny_config("unused"), enabled=False)
  _, boxes, valid = steps._targets(batch, patch, norm, aug, np.float32, jax.random.key(0),
                                   margin_targets)
  # The reference labels only the figure whose centre lies inside the patch.
  assert np.asarray(valid).tolist() == [[margin_targets, True, margin_targets]]
  np.testing.assert_allclose(boxes[0, 1], [5, 5, 55, 55])


def test_a_registered_selection_metric_decides_and_too_few_figures_warn(data_dir, tmp_path,
                                                                         monkeypatch, caplog):
  """The seam: an entry of SELECTION_METRICS named by eval.selection decides the
  checkpoint detection uses. The toy metric peaks at epoch 2 of 3 and reports
  the figures the reference's patch AP saw on a tiny validation epoch, the
  failure seen on real data: the user-facing route must say so in one line."""
  from midog_jax import train
  seen = {}

  def toy(context):
    seen["valid"] = sorted(c.file_name for c in context.cases)
    reference = selection.reference_ap(context)

    def metric(graphdef, state, epoch):
      measured = reference(graphdef, state, epoch)
      return selection.Measured(-float((epoch - 2) ** 2), measured.figures, measured.counted)
    return metric

  monkeypatch.setitem(selection.SELECTION_METRICS, "toy", toy)
  config = tiny_config(data_dir, num_epochs=3, valid_patches_per_epoch=8,
                       **{"eval.every_epochs": 1, "eval.selection": "toy"})
  mesh = _one_device()
  data = inputs.build(config, mesh)
  with caplog.at_level("WARNING"):
    summary = trainer.train(config, str(tmp_path), data, mesh).summary
  assert seen["valid"] == sorted(data.meta["valid"])
  per_epoch = data.train.steps_per_epoch
  assert summary["best_step"] == 2 * per_epoch and summary["best_valid_ap"] == 0.0

  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  chosen = next(r for r in rows if r["step"] == summary["best_step"])
  assert chosen["valid_figures_counted"] < selection.MIN_COUNTED_FIGURES
  assert chosen["valid_figures_counted"] <= chosen["valid_figures"]
  note = summary["selection_warning"]
  assert "model selection (toy) chose epoch 2" in note and "eval.selection=roi_ap" in note
  assert json.loads((tmp_path / "summary.json").read_text())["selection_warning"] == note
  assert [r.getMessage() for r in caplog.records if note in r.getMessage()] == [
      f"{tmp_path}: {note}"]
  assert f"warning        {note}" in train.format_summary(summary, str(tmp_path))

  config.eval.selection = "nothing_registered"
  with pytest.raises(ValueError, match="eval.selection 'nothing_registered'.*'reference'.*'toy'"):
    inputs.build(config, mesh)
