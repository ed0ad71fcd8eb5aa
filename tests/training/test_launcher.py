import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading

import pytest
from ml_collections import config_flags  # noqa: F401  (config files load through it)

from configs import common
from configs import default
from midog_jax import domains
from midog_jax import experiments
from midog_jax.training import launcher
from midog_jax.training import workdir
from tests.helpers import ROOT


def test_plans():
  assert len(launcher.plan_experiments("paper")) == 15
  names = [n for n, _ in launcher.plan_experiments("single_domain")]
  assert names == [f"single_{t}" for t in domains.TUMOR_SLUGS]


@pytest.mark.parametrize("hardware", launcher.HARDWARE)
def test_every_plan_config_loads(hardware):
  from ml_collections.config_flags import config_flags as cf
  for name, spec in launcher.plan_experiments("paper"):
    path, _, arg = launcher.config_arg(spec, hardware).partition(":")
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
    common.experiment_config("leave_one_out")
  with pytest.raises(KeyError, match="unknown tumour type"):
    common.experiment_config("single_domain=feline lymphoma")


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


# Stands in for `python -m midog_jax.train` in the launcher tests (no JAX):
# takes the training lock of each run as the trainer does (one run, or a run
# group's --member runs), records itself, finishes.
FAKE_TRAIN = '''
import json, os, shlex, sys, time
from midog_jax.training import workdir as workdir_lib
argv = sys.argv[1:]
members = [shlex.split(argv[i + 1]) for i, a in enumerate(argv) if a == "--member"] or [argv]
workdirs = [m[m.index("--workdir") + 1] for m in members]
# WorkdirInUse if a second process got here.
locks = [workdir_lib.Lock(w).acquire() for w in workdirs]
start = time.time()
time.sleep(0.3)
if os.environ.get("FAKE_FAIL") and any(os.environ["FAKE_FAIL"] in w for w in workdirs):
  sys.exit(3)
for member, workdir in zip(members, workdirs):
  with open(os.path.join(workdir, "trained.jsonl"), "a") as f:
    f.write(json.dumps({"start": start, "end": time.time(), "argv": member, "group": workdirs,
                        "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}) + "\\n")
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump({"status": "finished"}, f)
'''


@pytest.fixture
def fake_train(tmp_path, monkeypatch):
  script = tmp_path / "fake_train.py"
  script.write_text(FAKE_TRAIN)
  monkeypatch.setattr(launcher, "TRAIN_COMMAND", (sys.executable, str(script)))


def _trained(root):
  return {str(p.parent.relative_to(root)): [json.loads(l) for l in p.read_text().splitlines()]
          for p in root.glob("*/fold*/trained.jsonl")}


def test_shards_partition_the_plan():
  runs = launcher.plan_runs("paper", range(5))
  assert len(set(runs)) == len(runs) == 75
  for n in (1, 2, 4, 15, 75, 80):
    parts = [launcher.shard(runs, i, n) for i in range(n)]
    assert sorted(sum(parts, [])) == sorted(runs)  # Disjoint, and all of the plan.
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
  # Each part mixes experiments: fold 0 of all 15 is not one job's.
  assert len({e.split("/")[0] for e, _ in launcher.shard(runs, 0, 5)}) == 15
  assert launcher.parse_shard("3/15") == (3, 15)
  for bad in ("2/2", "-1/3", "1", "a/b", "0/0"):
    with pytest.raises(ValueError, match="--shard"):
      launcher.parse_shard(bad)


def test_device_env_pins_one_device_per_slot():
  assert launcher.device_env("cpu", 1, 2, {}) == {}
  assert launcher.device_env("gpu", 0, 1, {}) == {}  # One run: all devices.
  assert launcher.device_env("gpu", 1, 2, {}) == {"CUDA_VISIBLE_DEVICES": "1"}
  env = {"CUDA_VISIBLE_DEVICES": "4,6,7"}
  assert [launcher.device_env("gpu_large_batch", s, 3, env)["CUDA_VISIBLE_DEVICES"]
          for s in range(3)] == ["4", "6", "7"]
  with pytest.raises(ValueError, match="needs 4 GPUs"):
    launcher.device_env("gpu", 0, 4, env)
  tpu = [launcher.device_env("tpu", s, 4, {}) for s in range(4)]
  assert [t["TPU_VISIBLE_CHIPS"] for t in tpu] == ["0", "1", "2", "3"]
  assert len({t["TPU_PROCESS_PORT"] for t in tpu}) == 4
  assert all(t["TPU_CHIPS_PER_PROCESS_BOUNDS"] == "1,1,1" for t in tpu)


def test_help_imports_neither_jax_nor_tensorflow():
  code = ("import sys\nfrom midog_jax import experiments\n"
          "for argv in (['--help'], ['run', '--help']):\n"
          "  try:\n    experiments.main(argv)\n  except SystemExit:\n    pass\n"
          "print(sorted({'jax', 'tensorflow', 'pandas', 'sklearn'} & set(sys.modules)))")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=60, cwd=str(ROOT))
  assert proc.returncode == 0, proc.stderr
  assert "--parallel N" in proc.stdout and "--shard I/N" in proc.stdout
  assert proc.stdout.splitlines()[-1] == "[]"


def test_two_launchers_train_each_run_once(tmp_path, fake_train, capsys):
  root = tmp_path / "runs"
  runs = [r for r, _ in launcher.plan_runs("single_domain", (0, 1))]
  done, by_hand = runs[3], runs[8]
  (root / done).mkdir(parents=True)
  (root / done / "summary.json").write_text('{"status": "finished"}')
  (root / by_hand).mkdir(parents=True)
  argv = ["run", "--plan", "single_domain", "--folds", "0,1", "--workdir", str(root),
          "--parallel", "2", "--hardware", "gpu"]
  codes = []
  with workdir.Lock(str(root / by_hand)):  # A training started by hand.
    launchers = [threading.Thread(target=lambda: codes.append(experiments.main(argv)))
                 for _ in range(2)]
    for t in launchers:
      t.start()
    for t in launchers:
      t.join(120)
  assert codes == [0, 0]
  trained = _trained(root)
  assert sorted(trained) == sorted(set(runs) - {done, by_hand})
  assert all(len(v) == 1 for v in trained.values())  # Never twice.
  records = [v[0] for v in trained.values()]
  # Runs did overlap (two launchers, two devices each), each on one GPU.
  assert max(sum(a["start"] < b["end"] and b["start"] < a["end"] for b in records)
             for a in records) >= 2
  assert {r["cuda"] for r in records} == {"0", "1"}
  assert all(f"--config.fold={r[-1]}" in trained[r][0]["argv"] for r in trained)
  assert all((root / r / "train.log").exists() for r in trained)
  out = capsys.readouterr().out
  assert f"running elsewhere {by_hand}" in out and "13/14 runs done" in out


def test_shards_of_a_job_array_and_failures(tmp_path, fake_train, monkeypatch, capsys):
  root = tmp_path / "runs"
  argv = ["run", "--plan", "leave_one_out", "--folds", "0", "--workdir", str(root)]
  for i in range(3):
    assert experiments.main(argv + ["--shard", f"{i}/3", "--parallel", "3"]) == 0
    assert len(_trained(root)) == [3, 5, 7][i]  # 7 runs: parts of 3, 2 and 2.
  assert all(len(v) == 1 for v in _trained(root).values())
  # A failed run stops the launcher before it starts the next one.
  root = tmp_path / "failing"
  first = launcher.plan_runs("leave_one_out", (0,))[0][0]
  monkeypatch.setenv("FAKE_FAIL", first)
  capsys.readouterr()
  assert experiments.main(argv[:-1] + [str(root)]) == 3
  assert _trained(root) == {}
  assert f"error: {first} stopped (exit code 3)" in capsys.readouterr().err


def test_parallel_runs_finish_a_tiny_plan(plan_runs, synthetic_data_dir, tmp_path, monkeypatch):
  # The trained tiny plan with its summaries gone: `--parallel 2` starts both
  # runs at once as real trainings, which restore their last checkpoint,
  # accept the launcher's input_workers (a field that cannot change the
  # result) and finish without training again (no compiling: fast).
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  root = tmp_path / "runs"
  shutil.copytree(plan_runs / "all_domains", root / "all_domains")
  for k in (0, 1):
    (root / "all_domains" / f"fold{k}" / "summary.json").unlink()
  recorded = json.loads((root / "all_domains" / "fold0" / "config.json").read_text())
  keys = ["patch_size", "num_epochs", "batch_size", "train_patches_per_epoch",
          "valid_patches_per_epoch", "eval.window_min_overlap", "model.body_weights",
          "model.backbone", "model.channels"]
  sets = [f"{k}={workdir.flatten(recorded)[k]}" for k in keys]
  argv = ["run", "--plan", "all", "--folds", "0,1", "--workdir", str(root), "--data-dir",
          synthetic_data_dir, "--parallel", "2"] + [a for kv in sets for a in ("--set", kv)]
  assert [launcher.run_status(str(root / "all_domains" / f"fold{k}")) for k in (0, 1)] == [
      "started", "started"]
  assert experiments.main(argv) == 0
  workers = max(1, len(os.sched_getaffinity(0)) // 2)
  for k in (0, 1):
    run = root / "all_domains" / f"fold{k}"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs"] == recorded["num_epochs"]
    assert json.loads((run / "config.json").read_text())["input_workers"] == workers
    assert re.search(r"status\W+finished", (run / "train.log").read_text())  # Its output.


def test_run_groups_of_a_plan_in_plan_order_with_parallel_shards_and_failures(
    tmp_path, fake_train, monkeypatch, capsys):
  root = tmp_path / "runs"
  runs = [r for r, _ in launcher.plan_runs("single_domain", (0, 1, 2))]
  done, by_hand = runs[1], runs[7]
  (root / done).mkdir(parents=True)
  (root / done / "summary.json").write_text('{"status": "finished"}')
  (root / by_hand).mkdir(parents=True)
  argv = ["run", "--plan", "single_domain", "--folds", "0,1,2", "--workdir", str(root),
          "--group", "5", "--parallel", "2", "--hardware", "gpu"]
  with workdir.Lock(str(root / by_hand)):
    assert experiments.main(argv) == 0
  trained = _trained(root)
  assert sorted(trained) == sorted(set(runs) - {done, by_hand})
  assert all(len(v) == 1 for v in trained.values())  # Never twice.
  # Groups of 5 runs left to train, in plan order, each run in one process.
  left = [r for r in runs if r in trained]
  groups = [left[i:i + 5] for i in range(0, len(left), 5)]
  assert [len(g) for g in groups] == [5, 5, 5, 4]
  for g in groups:
    assert {tuple(trained[r][0]["group"]) for r in g} == {tuple(str(root / r) for r in g)}
    assert len({trained[r][0]["cuda"] for r in g}) == 1  # One device per group.
  assert {v[0]["cuda"] for v in trained.values()} == {"0", "1"}
  cores = len(os.sched_getaffinity(0))
  for r in trained:  # Each member's own options, and its share of the cores.
    options = trained[r][0]["argv"]
    assert options[:4] == ["--config", launcher.config_arg(dict(launcher.plan_runs(
        "single_domain", (0, 1, 2)))[r], "gpu"), "--workdir", str(root / r)]
    assert f"--config.fold={r[-1]}" in options
    assert f"--config.input_workers={max(1, cores // 10)}" in options
  out = capsys.readouterr().out
  assert "20/21 runs done" in out  # All but the run trained by hand.
  assert re.search(rf"running +{re.escape(left[0])} +group 1", out)
  assert re.search(rf"done +{re.escape(left[-1])} +group 4", out)
  assert (root / left[0] / "train.log").exists()  # A group's output: its first run's log.

  # A job array's part is grouped in its own order; a failing member stops the launcher.
  root = tmp_path / "sharded"
  part = [r for r, _ in launcher.shard(launcher.plan_runs("leave_one_out", (0, 1)), 1, 2)]
  monkeypatch.setenv("FAKE_FAIL", part[4])
  capsys.readouterr()
  assert experiments.main(["run", "--plan", "leave_one_out", "--folds", "0,1", "--workdir",
                           str(root), "--shard", "1/2", "--group", "3"]) == 3
  assert set(_trained(root)) == set(part[:3])  # The first group; the second failed, no third.
  assert [tuple(_trained(root)[r][0]["group"]) for r in part[:3]] == [
      tuple(str(root / r) for r in part[:3])] * 3
  assert f"error: the group of {', '.join(part[3:6])} stopped (exit code 3)" in (
      capsys.readouterr().err)
  with pytest.raises(ValueError, match="--group 0"):
    launcher.run_plan(launcher.Launch(str(root), group=0), "all", [0])


def test_a_group_command_gives_each_member_the_options_it_would_have_alone():
  args = launcher.Launch("/w", data_dir="/d x", hardware="gpu", overrides=("num_epochs=3",),
                         group=2)
  members = launcher.plan_runs("all", (0, 1))
  cmd = launcher.train_command(args, members)
  assert cmd[:len(launcher.TRAIN_COMMAND)] == list(launcher.TRAIN_COMMAND)
  given = [shlex.split(a) for a in cmd[len(launcher.TRAIN_COMMAND) + 1::2]]
  assert cmd[len(launcher.TRAIN_COMMAND)::2] == ["--member"] * 2
  assert given == [launcher.run_args(args, *m) for m in members]
  assert given[1][:4] == ["--config", launcher.config_arg("all_domains", "gpu"), "--workdir",
                          "/w/all_domains/fold1"]
  assert "--config.data_dir=/d x" in given[0] and "--config.num_epochs=3" in given[0]
  single = launcher.train_command(launcher.Launch("/w"), members[:1])
  assert single == [*launcher.TRAIN_COMMAND, *launcher.run_args(launcher.Launch("/w"), *members[0])]
