"""Every command in README.md is checked against the command line it calls."""

import functools
import importlib
import re
import shlex
import subprocess
import sys

import pytest

from tests.helpers import ROOT, env_without_accelerators

README = (ROOT / "README.md").read_text()
_SUBCOMMANDS = {"eval": ("score",), "experiments": ("folds", "run"), "weights": ("convert",)}


def _commands():
  """Shell commands of the README's ```bash blocks, continuations joined."""
  out = []
  for block in re.findall(r"```bash\n(.*?)```", README, re.S):
    for line in block.replace("\\\n", " ").splitlines():
      for part in line.split("&&"):
        part = part.split("#")[0].strip()
        if part:
          out.append(part)
  return out


COMMANDS = _commands()


@functools.lru_cache(maxsize=None)
def _help(*argv):
  proc = subprocess.run([sys.executable, *argv, "--help"], capture_output=True, text=True,
                        env=env_without_accelerators(), cwd=ROOT, timeout=300)
  return proc.stdout + proc.stderr


def _flags(words):
  # Optional parts like "[--threshold 0.5 | --x y]" still name real flags.
  return [w.strip("[]").split("=")[0] for w in words if w.strip("[]").startswith("--")]


def test_the_two_setup_commands_are_in_readme_and_ci():
  assert "pip install -e . && python -m midog_jax.demo" in README
  test_cmd = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q'
  assert test_cmd in README
  ci = (ROOT / ".ci" / "run").read_text()
  assert 'pip install -q "torch==2.13.0"' in ci and 'pip install -q -e ".[test]"' in ci
  assert ci.strip().splitlines()[-1] == "python -m pytest -q"


@pytest.mark.parametrize("command", [c for c in COMMANDS if "python -m midog_jax." in c])
def test_midog_commands_match_their_command_lines(command):
  # A quoted argument holding options (train's --member "...") is checked as options too.
  words = [w for word in shlex.split(command.replace("|", " ")) for w in word.split()]
  i = words.index("-m")
  module = words[i + 1]
  rest = words[i + 2:]
  sub = rest[0] if rest and rest[0] in _SUBCOMMANDS.get(module.split(".")[-1], ()) else None
  text = _help("-m", module, *([sub] if sub else []))
  assert "usage" in text.lower() or "flags" in text.lower(), text[-2000:]
  for flag in _flags(rest):
    if flag.startswith("--config."):
      continue  # Checked against the configuration below.
    assert flag in text, f"{flag} is not an option of {module} {sub or ''}"
  config_file = next((w.split(":")[0] for w in rest if w.startswith("configs/")), None)
  overrides = [w for w in rest if w.startswith("--config.")]
  if overrides:
    path = config_file or "configs/default.py"
    config = importlib.import_module(path[:-3].replace("/", ".")).get_config()
    for o in overrides:
      node = config
      for key in o[len("--config."):].split("=")[0].split("."):
        assert key in node, f"{o}: no field {key!r} in {path}"
        node = node[key]


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("tfds build")])
def test_tfds_build_commands(command):
  text = _help("-m", "tensorflow_datasets.scripts.cli.main", "build")
  for flag in _flags(shlex.split(command)):
    assert flag in text, f"{flag} is not an option of tfds build"


def test_every_config_named_in_readme_exists():
  for name in set(re.findall(r"configs/(\w+)\.py", README)):
    assert (ROOT / "configs" / f"{name}.py").exists(), name


def _figures():
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import figures  # benchmarks/figures.py, a script beside the benchmarks.
  return figures


def test_quoted_figures_equal_the_files_that_recorded_them():
  figures = _figures()
  quoted = dict(figures._SPAN.findall(README))
  # The demo's headline numbers and times, and the projections, are all quoted from files.
  for name in ("demo.f1", "demo.ap", "demo.threshold", "demo.seconds", "demo.machine",
               "demo.score_table", "projection.h200_run", "projection.cpu_run"):
    assert name in quoted, name
  assert figures.differences(README) == []
  for record in ("demo", "projection"):
    assert (figures.RESULTS / f"{record}.json").exists(), record
  assert figures._load("demo")["machine"]["cpu"]  # Every measured figure names its machine.


def test_a_changed_figure_is_caught():
  figures = _figures()
  changed = README.replace("<!-- figure:demo.f1 -->", "<!-- figure:demo.f1 -->9", 1)
  assert [name for name, _, _ in figures.differences(changed)] == ["demo.f1"]
  assert figures.differences(figures.update(changed)) == []
