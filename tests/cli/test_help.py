"""Help that tells the truth: every option listed with its text, argparse's layout
everywhere, plain configuration output, and no traceback when the reader goes away."""

import json
import subprocess
import sys

import pytest
import yaml

from tests.cli.test_cli import _env, _run
from tests.helpers import ROOT

ARGPARSE_COMMANDS = ("eval", "detect", "stats", "synthetic", "weights", "experiments", "slides",
                     "export")


def _options_without_text(help_text: str) -> list[str]:
  """Option lines of an argparse help with no explanation beside or below them."""
  lines = help_text.splitlines()
  bare = []
  for i, line in enumerate(lines):
    if not line.startswith("  -"):
      continue
    beside = len(line.split("  ")) > 2 and line.split("  ")[-1].strip()
    below = i + 1 < len(lines) and lines[i + 1].startswith(" " * 10) and lines[i + 1].strip()
    if not (beside or below):
      bare.append(line.strip())
  return bare


@pytest.mark.parametrize("name", ARGPARSE_COMMANDS)
def test_every_option_says_what_it_does(name):
  out = _run("-m", f"midog_jax.{name}", "--help").stdout
  assert "options:" in out, out
  assert _options_without_text(out) == []


def test_eval_help_lists_the_run_evaluation_and_the_score_command():
  out = _run("-m", "midog_jax.eval", "--help").stdout
  for option in ("--runs RUNS", "--out REPORT", "--compare-paper", "--folds", "--checkpoint",
                 "score "):
    assert option in out, option


@pytest.mark.parametrize("name", ("train", "demo"))
def test_absl_commands_answer_in_argparse_layout(name):
  out = _run("-m", f"midog_jax.{name}", "--help").stdout
  assert out.startswith(f"usage: python -m midog_jax.{name} [options]")
  assert "--[no]" not in out and "(default: '" not in out
  for option in ("-h, --help", "--config FILE[:ARG]", "--config.FIELD=VALUE", "--workdir DIR",
                 "-v N, --verbosity N"):
    assert option in out, option
  assert _options_without_text(out) == []


def test_print_config_is_plain_yaml_equal_to_its_json():
  args = ("-m", "midog_jax.train", "--config", "configs/demo.py", "--print_config")
  text = _run(*args).stdout
  assert "!!python" not in text
  assert yaml.safe_load(text) == json.loads(_run(*args, "--json").stdout)


@pytest.fixture(scope="module")
def scored_files(tmp_path_factory):
  """A tiny annotated data set and a prediction file for it."""
  from midog_jax.data import synthetic
  from midog_jax.detection import predictions
  out = tmp_path_factory.mktemp("tiny")
  cases = synthetic.write_dataset(str(out), 1, 64, 64, progress=False)
  predictions.write_predictions(out / "p.json", {c.file_name: ([[10.0, 10.0]], [0.9])
                                                 for c in cases},
                                {c.file_name: c.um_per_px for c in cases})
  return out


@pytest.mark.parametrize("command", ("score", "print_config"))
def test_a_reader_that_goes_away_ends_the_output_quietly(command, scored_files):
  argv = (["midog_jax.eval", "score", "--annotations", str(scored_files / "MIDOG++.json"),
           "--splits", str(scored_files / "datasets_xvalidation.csv"), "--predictions",
           str(scored_files / "p.json"), "--split", "train", "--json"] if command == "score"
          else ["midog_jax.train", "--config", "configs/demo.py", "--print_config"])
  proc = subprocess.Popen([sys.executable, "-m", *argv], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
  proc.stdout.close()  # As `| head` does: every write after this fails with EPIPE.
  stderr = proc.stderr.read()
  assert proc.wait(timeout=120) in (0, 1)
  assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
