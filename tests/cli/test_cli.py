"""The command lines: help, exit codes, quiet logs and progress that reads well in a file."""

import io
import json
import logging
import os
import re
import subprocess
import sys

import pytest

from midog_jax import console
from tests.helpers import ROOT
from tests.train_fixtures import network_flags

ENTRY_POINTS = ("train", "detect", "eval", "demo", "stats", "weights")
HEAVY = ("jax", "tensorflow", "tensorflow_datasets", "flax", "orbax")
# Start-up lines of TensorFlow, XLA and absl that a run must not print.
NOISE = ("oneDNN", "absl::InitializeLog", "cpu_feature_guard", "TF_ENABLE_ONEDNN_OPTS",
         "Logging before flag parsing", "Variant folder", "\x1b[", "\r")


def _env(**extra):
  """The user's environment: none of the test session's TensorFlow settings."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS", "TQDM_DISABLE",
                      "XLA_FLAGS")}
  env.update(CUDA_VISIBLE_DEVICES="", **extra)
  return env


def _run(*argv, timeout=300):
  return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=_env(),
                        cwd=ROOT, timeout=timeout)


_IMPORTS_AFTER = """
import runpy, sys
sys.argv = [sys.argv[1]] + sys.argv[2:]
try:
  runpy.run_module(sys.argv[0], run_name="__main__")
except SystemExit as e:
  code = e.code
print("exit", code, "heavy", *sorted(m for m in {heavy} if m in sys.modules), file=sys.stderr)
"""


def _run_and_list_imports(module, *args):
  """(exit code, heavy modules imported, stdout, stderr) of `python -m module args`."""
  proc = _run("-c", _IMPORTS_AFTER.format(heavy=HEAVY), module, *args)
  last = proc.stderr.strip().splitlines()[-1].split()
  assert last[0] == "exit", proc.stderr[-3000:]
  return int(last[1] or 0), last[3:], proc.stdout, proc.stderr


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_help_exits_0_before_any_heavy_import(name):
  code, heavy, out, err = _run_and_list_imports(f"midog_jax.{name}", "--help")
  assert code == 0, err[-2000:]
  assert heavy == [], f"--help imported {heavy}"
  assert "usage" in out.lower() or "flags:" in out
  # No run of spaces where a docstring's line continuation was joined.
  assert not re.search(r"\S {4,}(\[|--)", out), out
  for word in NOISE:
    assert word not in err


def test_train_help_says_how_to_print_the_resolved_config():
  out = _run("-m", "midog_jax.train", "--help").stdout
  assert "--print_config" in out and "--config.FIELD=VALUE" in out
  # No run of spaces from a joined line continuation in the usage lines.
  assert "W \\\n      [--config.data_dir=D]" in out


def test_print_config_shows_overrides_and_imports_nothing_heavy():
  code, heavy, out, err = _run_and_list_imports(
      "midog_jax.train", "--config", "configs/demo.py:canine_lymphoma", "--print_config",
      "--json", "--config.num_epochs=3")
  assert code == 0, err[-2000:]
  config = json.loads(out)
  assert (config["experiment"], config["tumor_types"]) == ("single_canine_lymphoma",
                                                           "canine_lymphoma")
  assert config["num_epochs"] == 3 and config["patch_size"] == 128  # The demo's scale.
  assert heavy == []


@pytest.mark.parametrize("args,message", [
    (["--config", "configs/demo.py"], "--workdir is required"),
    (["--config", "configs/demo.py", "--workdir", "w", "--nonsense"], "nonsense"),
    (["--config", "configs/demo.py", "--print_config", "--config.no_such_field=1"],
     "no_such_field"),
    (["--config", "configs/demo.py:no_such_type", "--print_config"], "no_such_type"),
    (["--config", "configs/no_such_file.py", "--print_config"], "no_such_file.py"),
    (["--member", "--config configs/demo.py --workdir w", "--workdir", "v"],
     "--member replaces --config and --workdir"),
])
def test_train_usage_errors_are_one_line_and_exit_2(args, message):
  proc = _run("-m", "midog_jax.train", *args)
  assert proc.returncode == 2
  err = proc.stderr.strip()
  assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_a_failing_run_prints_no_startup_noise(tmp_path):
  """A real command that imports TensorFlow, JAX and TFDS, then fails on a missing dataset."""
  proc = _run("-m", "midog_jax.train", "--config", "configs/demo.py",
              "--workdir", str(tmp_path / "w"), f"--config.data_dir={tmp_path / 'none'}")
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith("error: ") and "Traceback" not in proc.stderr
  for word in NOISE:
    assert word not in proc.stderr, word


def test_sigterm_during_start_up_is_one_line_and_exit_143(synthetic_data_dir, tmp_path):
  """A scheduler's SIGTERM before the training loop: said in one line, nothing written."""
  import signal
  proc = subprocess.Popen(
      [sys.executable, "-m", "midog_jax.train", "--config", "configs/demo.py",
       "--workdir", str(tmp_path / "w"), f"--config.data_dir={synthetic_data_dir}",
       "--config.patch_size=64", "--config.model.body_weights=none", *network_flags()],
      stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
  lines = []
  for line in proc.stderr:  # The cases are read: start-up goes on (caches, model, compile).
    lines.append(line)
    if "training and" in line and "validation cases" in line:
      proc.send_signal(signal.SIGTERM)
      break
  rest = proc.stderr.read()
  assert proc.wait(timeout=300) == 143, "".join(lines) + rest
  assert rest.strip().splitlines()[-1] == ("error: interrupted outside the training loop; nothing "
                                           "was lost: run the same command again to resume")
  assert "Traceback" not in rest
  assert not (tmp_path / "w" / "checkpoints").exists() or not any(
      p.name.isdigit() for p in (tmp_path / "w" / "checkpoints").iterdir())


def test_detect_help_stderr_is_empty():
  proc = _run("-m", "midog_jax.detect", "--help")
  assert proc.returncode == 0 and proc.stderr == ""


def test_configs_demo_takes_a_tumour_type():
  from configs import demo
  assert demo.get_config().experiment == "all_domains"
  config = demo.get_config("canine lymphoma")  # Any spelling the registry knows.
  assert (config.experiment, config.tumor_types) == ("single_canine_lymphoma", "canine_lymphoma")


class _Clock:
  def __init__(self):
    self.t = 0.0

  def __call__(self):
    return self.t


def test_progress_off_a_terminal_writes_a_line_per_interval():
  clock, out = _Clock(), io.StringIO()
  p = console.Progress(100, "fold0", "step", initial=10, interval=30, stream=out, tty=False,
                   clock=clock)
  clock.t = 5.0
  p.update()  # The rate counts from the end of the first step (which compiles).
  for _ in range(19):
    clock.t += 1.0
    p.set_postfix("loss 0.5000")
    p.update()
  assert out.getvalue() == ""  # 24 s: nothing yet.
  for _ in range(10):
    clock.t += 1.0
    p.update()
  # 30 s after the start: one line; 25 steps in the 25 s since the first.
  assert out.getvalue() == "fold0: 36/100 step, loss 0.5000, 1 step/s, ETA 1:04\n"
  p.write("epoch 1/3: train loss 0.5000")
  p.close()
  p.close()
  lines = out.getvalue().splitlines()
  assert lines[1:] == ["epoch 1/3: train loss 0.5000",
                       "fold0: 40/100 step, loss 0.5000, 1 step/s, took 0:34"]


def test_progress_disabled_and_iterable_forms():
  out = io.StringIO()
  p = console.Progress(3, "x", enabled=False, stream=out, tty=False, interval=0)
  p.update()
  p.write("hidden")
  p.close()
  assert out.getvalue() == ""
  out = io.StringIO()
  assert list(console.progress(range(3), 3, "detect", "image", stream=out, tty=False,
                           interval=0)) == [0, 1, 2]
  lines = out.getvalue().splitlines()
  assert lines[0].startswith("detect: 1/3 image") and lines[-1].startswith("detect: 3/3 image")
  assert "took" in lines[-1] and "\r" not in out.getvalue()


def test_format_duration():
  assert [console.format_duration(s) for s in (0, 59.6, 61, 3600, 3725)] == [
      "0:00", "1:00", "1:01", "1:00:00", "1:02:05"]


@pytest.fixture
def restore_logging():
  root = logging.getLogger()
  handlers, level = list(root.handlers), root.level
  yield
  for h in list(root.handlers):
    if h not in handlers:
      root.removeHandler(h)
  root.setLevel(level)


_LIB = "/usr/lib/python3/site-packages/lib/x.py"
_OWN = str(ROOT / "midog_jax" / "x.py")
# (logger, level, file, message): the project logs through the root logger and
# "midog_jax.*"; libraries through their own loggers, "absl", or the root logger.
_RECORDS = (("midog_jax.x", logging.DEBUG, _OWN, "own debug"),
            ("root", logging.INFO, _OWN, "own info"),
            ("midog_jax.x", logging.WARNING, _OWN, "own warning"),
            ("absl", logging.DEBUG, _LIB, "absl debug"),
            ("absl", logging.INFO, _LIB, "absl info"),
            ("root", logging.INFO, _LIB, "lib info"),
            ("absl", logging.WARNING, _LIB, "absl warning"),
            # TFDS's notice before a dataset's first build: shown only at verbosity 2.
            ("absl", logging.WARNING, "/x/tensorflow_datasets/core/utils/file_utils.py",
             "Variant folder %s has no %s"))


@pytest.mark.parametrize("verbosity,shown", [
    (-1, ["warning: own warning", "warning: absl warning"]),
    (0, ["own info", "warning: own warning", "warning: absl warning"]),
    (1, ["debug midog_jax.x: own debug", "info root: own info",
         "warning midog_jax.x: own warning", "info absl: absl info", "info root: lib info",
         "warning absl: absl warning"]),
    (2, ["debug midog_jax.x: own debug", "info root: own info",
         "warning midog_jax.x: own warning", "debug absl: absl debug", "info absl: absl info",
         "info root: lib info", "warning absl: absl warning",
         "warning absl: Variant folder x has no y"]),
])
def test_logging_levels_by_verbosity(verbosity, shown, capsys, restore_logging):
  console.setup_logging(verbosity)
  console.setup_logging(verbosity)  # Idempotent: one handler, each line once.
  for name, level, path, text in _RECORDS:
    logger = logging.getLogger(None if name == "root" else name)
    args = ("x", "y") if "%s" in text else ()
    logger.handle(logger.makeRecord(name, level, path, 1, text, args, None))
  assert capsys.readouterr().err.splitlines() == shown


def test_a_command_called_in_process_leaves_logging_as_it_was(capsys):
  from midog_jax import stats
  root = logging.getLogger()
  before = list(root.handlers), root.level
  assert stats.main(["--annotations", "missing.json", "--splits", "missing.csv"]) == 2
  assert (list(root.handlers), root.level) == before
  assert capsys.readouterr().err.startswith("error: ")
