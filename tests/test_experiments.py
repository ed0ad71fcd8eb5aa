import json

import pytest
from ml_collections import config_flags  # noqa: F401  (config files load through it)

from configs import default
from midog_jax import domains, experiments


def test_plans():
  assert len(experiments.plan_experiments("paper")) == 15
  names = [n for n, _ in experiments.plan_experiments("single_domain")]
  assert names == [f"single_{t}" for t in domains.TUMOR_SLUGS]


@pytest.mark.parametrize("hardware", experiments.HARDWARE)
def test_every_plan_config_loads(hardware):
  from ml_collections.config_flags import config_flags as cf
  for name, spec in experiments.plan_experiments("paper"):
    path, _, arg = experiments.config_arg(spec, hardware).partition(":")
    module = cf._LoadConfigModule(f"cfg_{hardware}_{name}", path)
    config = module.get_config(arg) if arg else module.get_config()
    assert config.experiment == name
    assert config.model.body_weights == "imagenet"  # The reference's initialisation.
    reference = default.get_config()
    if hardware in ("gpu", "tpu"):  # The paper's protocol, in bf16.
      assert (config.batch_size, config.optim.max_lr) == (12, reference.optim.max_lr)
      assert config.model.dtype == "bfloat16"
    elif hardware != "cpu":  # Larger batches, square-root learning rate.
      batch = {"gpu_large_batch": 64, "tpu_large_batch": 128}[hardware]
      assert config.batch_size == batch and config.model.dtype == "bfloat16"
      assert config.optim.max_lr == pytest.approx(reference.optim.max_lr * (batch / 12) ** 0.5)
    else:
      assert (config.batch_size, config.model.dtype) == (12, "float32")


def test_configs_are_locked_and_validated():
  config = default.get_config()
  config.lock()
  with pytest.raises(AttributeError, match="learning_rate"):
    config.optim.learning_rate = 1.0
  with pytest.raises(ValueError, match="leave_one_out=<tumour type>"):
    default.experiment_config("leave_one_out")
  with pytest.raises(KeyError, match="unknown tumour type"):
    default.experiment_config("single_domain=feline lymphoma")


def test_plan_runs_every_fold_and_resumes(plan_runs, capsys):
  for k in (0, 1):
    summary = json.loads((plan_runs / "all_domains" / f"fold{k}" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs"] == 2
    cases = json.loads((plan_runs / "all_domains" / f"fold{k}" / "cases.json").read_text())
    assert cases["fold"] == k
  # A second call finds everything done and trains nothing.
  capsys.readouterr()
  assert experiments.main(["run", "--plan", "all", "--workdir", str(plan_runs),
                           "--folds", "0,1"]) == 0
  assert "2/2 runs done" in capsys.readouterr().out
