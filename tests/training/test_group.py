"""Run groups: K runs in one program give, run by run, what each run gives alone.

The runs here have a toy body (three convolutions and a BatchNorm, under the
real FPN, heads, loss, augmentation and optimiser): compiling the group's
program is most of these tests' time on a CPU, and the toy body halves it.
"""

import functools
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from midog_jax import sharding
from midog_jax.model import backbones
from midog_jax.model import layers
from midog_jax.model import retinanet
from midog_jax.training import group
from midog_jax.training import inputs
from midog_jax.training import metric_writer
from midog_jax.training import optim
from midog_jax.training import steps
from midog_jax.training import trainer
from tests.train_fixtures import TEST_NETWORK, tiny_config

TIMING = ("epoch_seconds", "train_seconds")


class ToyBody(nnx.Module):
  """C3, C4, C5 at strides 8, 16, 32 from three convolutions, the first with BatchNorm."""

  def __init__(self, *, dtype, rngs):
    kw = dict(bias=True, init=layers.KAIMING_OUT, dtype=dtype, rngs=rngs)
    self.stem = layers.conv(3, 8, 3, 8, **kw)
    self.norm = nnx.BatchNorm(8, dtype=dtype, rngs=rngs)
    self.mid = layers.conv(8, 16, 3, 2, **kw)
    self.late = layers.conv(16, 24, 3, 2, **kw)

  def __call__(self, x, train=False):
    c3 = jax.nn.relu(self.norm(self.stem(x), use_running_average=not train))
    c4 = jax.nn.relu(self.mid(c3))
    return c3, c4, jax.nn.relu(self.late(c4))


TOY = backbones.Backbone(make=ToyBody, feature_channels=(8, 16, 24),
                         late_layers=frozenset({"late"}))


def register_toy():
  """Adds the toy body to the table (for processes the tests start)."""
  backbones.BACKBONES.setdefault("toy", TOY)


@pytest.fixture
def toy(monkeypatch):
  monkeypatch.setitem(backbones.BACKBONES, "toy", TOY)


# The five runs: seeds 0-4 of one fold, each 4 steps; run 1 in one epoch of 4
# steps, the others in 2 epochs of 2 (runs of other schedules:
# `test_runs_of_other_schedules_get_their_own_optimiser_steps`). The learning
# rate keeps these tiny runs from chaos: at the demo's 1e-3 from scratch,
# last-bit differences grow about tenfold a step, to a tenth of what the
# weights moved within 4 steps.
MEMBERS = ({}, {"train_patches_per_epoch": 32, "num_epochs": 1}, {}, {}, {})
SETTINGS = {"train_patches_per_epoch": 16, "optim.max_lr": 2e-5, "model.backbone": "toy",
            "eval.every_epochs": 0}


def member_configs(data_dir, **overrides):
  return [tiny_config(data_dir, seed=k, **{**SETTINGS, **extra, **overrides})
          for k, extra in enumerate(MEMBERS)]


def member_options(data_dir, workdir: pathlib.Path, k: int, **overrides) -> list[str]:
  """Run k of `member_configs(data_dir, **overrides)` as `train` options (the launcher's form)."""
  settings = {"patch_size": 64, "batch_size": 8, "valid_patches_per_epoch": 8, "num_epochs": 2,
              "prefetch": 0, "seed": k, **TEST_NETWORK, **SETTINGS, **MEMBERS[k], **overrides}
  return ["--config", "configs/demo.py", "--workdir", str(workdir),
          f"--config.data_dir={data_dir}", *(f"--config.{f}={v}" for f, v in settings.items())]


def one_device():
  return sharding.make_mesh(jax.devices()[:1])


def rows(workdir):
  return [{k: v for k, v in r.items() if k not in TIMING}
          for r in metric_writer.read_metrics(str(workdir))]


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_a_group_of_five_runs_equals_each_run_trained_alone(synthetic_data_dir, tmp_path, toy):
  configs = member_configs(synthetic_data_dir)
  mesh = one_device()
  datas = [inputs.build(c, mesh) for c in configs]
  assert [d.train.steps_per_epoch for d in datas] == [2, 4, 2, 2, 2]
  grouped = group.train_group(configs, [tmp_path / f"group/run{k}" for k in range(5)], datas,
                              mesh)
  alone = [trainer.train(c, str(tmp_path / f"alone/run{k}"), d, mesh)
           for k, (c, d) in enumerate(zip(configs, datas))]
  init = [steps.split_model(retinanet.build_model(
      retinanet.RetinaNetConfig.from_config(c), seed=c.seed))[1] for c in configs]
  for k in range(5):
    g, a = tmp_path / f"group/run{k}", tmp_path / f"alone/run{k}"
    assert sorted(os.listdir(g)) == sorted(os.listdir(a))  # The same files, written alike.
    for name in ("config.json", "cases.json", "normalization.json"):
      assert (g / name).read_text() == (a / name).read_text()
    assert sorted(os.listdir(g / "checkpoints")) == sorted(os.listdir(a / "checkpoints"))
    got, want = rows(g), rows(a)
    assert [r["step"] for r in got] == [r["step"] for r in want] == ([4] if k == 1 else [2, 4])
    # Losses agree to float32 rounding, the rest of each row exactly.
    for r, s in zip(got, want):
      for field in ("train_loss", "valid_loss"):
        assert r[field] == pytest.approx(s[field], rel=1e-5), (k, r, s)
      assert {f: r[f] for f in r if "loss" not in f} == {f: s[f] for f in s if "loss" not in f}
    summary = {f: v for f, v in grouped[k].summary.items() if f not in ("final",) + TIMING}
    assert summary == {f: v for f, v in alone[k].summary.items() if f not in ("final",) + TIMING}
    # Parameters: the mapped forward and backward passes sum in another order
    # (XLA lowers some batched convolutions' weight gradients differently), so
    # they differ in the last bits; a thousandth of the distance each run moved
    # bounds it (measured on the project's machine: about 1e-5 of it, 2e-7 at
    # most per weight; losses within 6e-7).
    p_group, p_alone, p_init = (leaves(x) for x in (grouped[k].state.params,
                                                     alone[k].state.params, init[k]))
    moved = np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(p_alone, p_init)))
    apart = np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(p_alone, p_group)))
    assert 0 < moved and apart < 1e-3 * moved, (k, apart, moved)
    for x, y in zip(leaves(grouped[k].state.batch_stats), leaves(alone[k].state.batch_stats)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)  # Each run's own statistics.
    # The checkpoint detection reads holds the group's state.
    with ocp.CheckpointManager(g / "checkpoints") as mngr:
      saved = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
          state=ocp.args.StandardRestore())).state
    for x, y in zip(leaves(saved["params"]), p_group):
      np.testing.assert_array_equal(x, y)


def test_runs_of_other_schedules_get_their_own_optimiser_steps():
  """Runs of other lengths have other one-cycle schedules: each run of a group
  takes its own optimiser steps. A run alone with its schedule is updated
  unmapped, bit for bit; runs updated together (mapped) agree to a unit in the
  last place (XLA's vectorised loops round a few elements differently)."""
  config = tiny_config("unused")
  rng = np.random.default_rng(0)
  params = {"body": {"stem": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                     "late": jnp.asarray(rng.normal(size=(5,)), jnp.float32)},
            "fpn": jnp.asarray(rng.normal(size=(6,)), jnp.float32)}
  for discriminative in (None, (1e-4, 1e-3)):
    config.optim.discriminative = discriminative
    txs = [optim.from_config(config, total) for total in (8, 12, 8)]
    groups = [(txs[0], (0, 2)), (txs[1], (1,))]

    def grads(step, k):
      r = np.random.default_rng(100 * step + k)
      return jax.tree.map(lambda x: jnp.asarray(r.normal(size=x.shape), jnp.float32), params)

    alone = []
    for k, tx in enumerate(txs):
      p, o = params, tx.init(params)
      update = jax.jit(steps.apply_updates(tx))
      for step in range(5):
        p, o = update(grads(step, k), p, o)
      alone.append((p, o))
    stack = lambda trees: jax.tree.map(lambda *x: jnp.stack(x), *trees)  # noqa: E731
    p, o = stack([params] * 3), stack([tx.init(params) for tx in txs])
    update = jax.jit(lambda g, p, o: steps._group_updates(groups, g, p, o))
    for step in range(5):
      p, o = update(stack([grads(step, k) for k in range(3)]), p, o)
    for k in range(3):
      for x, y in zip(leaves(alone[k]), leaves((p, o))):
        check = np.testing.assert_array_equal if k == 1 else functools.partial(
            np.testing.assert_allclose, rtol=2e-7, atol=0)
        check(x, y[k], err_msg=f"run {k}, {discriminative}")
    rates = [optim.hyperparams(jax.tree.map(lambda x: x[k], o)) for k in range(3)]
    assert rates[0] != rates[1] and rates == [optim.hyperparams(a[1]) for a in alone]


def test_runs_that_cannot_share_a_program_are_refused(synthetic_data_dir, tmp_path):
  configs = member_configs(synthetic_data_dir)[:2]
  configs[1].patch_size = 96
  workdirs = [tmp_path / "a", tmp_path / "b"]
  with pytest.raises(group.GroupMismatch, match=r"b has patch_size=96 but .*a has 64.*another "
                     "group"):
    group.train_group(configs, workdirs, [None, None])
  assert not any(w.exists() for w in workdirs)  # Refused before anything was written.
  configs[1].patch_size = 64
  configs[1].model.body_weights = "imagenet"  # Initial weights only: allowed.
  for c, rates in zip(configs, ((1e-5, 1e-4), (2e-5, 2e-4))):  # Other rates: allowed.
    c.optim.discriminative = rates
  group.check_members(configs, workdirs)
  configs[0].optim.discriminative = None  # But not another optimiser state.
  with pytest.raises(group.GroupMismatch, match=r"optim.discriminative=\"yes\" but .* \"no\""):
    group.check_members(configs, workdirs)
  configs[1].optim.discriminative = None
  with pytest.raises(group.GroupMismatch, match="share the workdir"):
    group.check_members(configs, [tmp_path / "a", tmp_path / "x" / ".." / "a"])
  with pytest.raises(group.GroupMismatch, match=r"2 configuration\(s\) for 1 workdir"):
    group.check_members(configs, workdirs[:1])
  for options, message in (
      (["--config", "configs/demo.py"], "needs --config and --workdir"),
      (["--config", "configs/demo.py", "--workdir", "w", "--config.no_such_field=1"],
       "no_such_field"),
      (["--config", "configs/demo.py", "--workdir", "w", "--config.fold=7"], "not in 0..4"),
      (["--config", "configs/none.py", "--workdir", "w"], "none.py")):
    with pytest.raises(group.GroupMismatch, match=message):
      group.member_from_args(options)
  config, workdir = group.member_from_args(["--config", "configs/demo.py", "--workdir", "w",
                                            "--config.fold=3", "--config.seed=7"])
  assert (config.fold, config.seed, workdir) == (3, 7, "w")
  # Each member's overrides are its own, not those of the command line.
  assert group.member_from_args(["--config", "configs/demo.py", "--workdir", "v"])[0].fold == 0
