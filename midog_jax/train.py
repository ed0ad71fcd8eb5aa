"""Trains one (experiment, fold) run; running it again resumes.

  python -m midog_jax.train --config configs/default.py --workdir W \\
      [--config.data_dir=D] [--config.fold=0] [--config.num_epochs=200]
  python -m midog_jax.train --config configs/single_domain.py:canine_lymphoma --print_config

Every field of the configuration can be set with --config.FIELD=VALUE;
--print_config prints the resolved configuration (the file with those
settings) and exits without training. The run ends with a short table of
its result (--json: the same as JSON). Progress is a bar on a terminal and a
line every 30 s in a log file; --verbosity=1 (-v 1) adds debug lines and
other libraries' information, --verbosity=-1 keeps only warnings.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from typing import Any, Sequence

from absl import flags
from absl import logging as absl_logging  # noqa: F401  Defines --verbosity (-v).
from ml_collections import config_flags

from midog_jax import console

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A configs/*.py file with get_config() (configs/X.py:ARG passes ARG); "
    "fields overridable as --config.FIELD=VALUE.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and logs go (required to "
                               "train).")
_PRINT_CONFIG = flags.DEFINE_boolean(
    "print_config", False, "Print the resolved configuration (with every --config.FIELD "
    "override) and exit.")
_JSON = flags.DEFINE_boolean("json", False, "Print the final summary (or, with "
                             "--print_config, the configuration) as JSON.")


def _usage_error(message: str) -> int:
  print(f"error: {message} (see python -m midog_jax.train --help)", file=sys.stderr)
  return 2


def format_summary(summary: dict[str, Any], workdir: str) -> str:
  """The run's result as a few aligned lines."""
  if summary.get("status") != "finished":
    return (f"run     {workdir}\nstatus  {summary.get('status')} at step {summary.get('step')}; "
            "run the same command again to resume")
  final = summary.get("final") or {}
  rows = [("run", workdir), ("status", "finished"),
          ("epochs", f"{summary.get('epochs')} ({summary.get('steps')} steps)"),
          *((f"{k} loss", ("n/a" if final.get(f"{k}_loss") is None
                           else format(final[f"{k}_loss"], ".4f")) + " (last epoch)")
            for k in ("train", "valid"))]
  if summary.get("best_valid_ap") is not None:
    rows.append(("best valid AP", f"{summary['best_valid_ap']:.4f} at step "
                 f"{summary.get('best_step')} (the checkpoint detection uses)"))
  rows.append(("training time", console.format_duration(summary.get("train_seconds") or 0)))
  if summary.get("selection_warning"):
    rows.append(("warning", summary["selection_warning"]))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: Sequence[str]) -> int:
  """Trains with the parsed flags (also callable by `absl.app.run`)."""
  if len(argv) > 1:
    return _usage_error(f"unexpected arguments {' '.join(argv[1:])}")
  with console.logging_to_stderr(console.absl_verbosity()):
    return _main()


def _main() -> int:
  config = _CONFIG.value
  if config is None:
    return _usage_error("--config is required, e.g. --config configs/default.py")
  try:
    config.fold  # ml_collections defers a config file's load error to the first access.
  except OSError as e:
    return _usage_error(str(e))
  if _PRINT_CONFIG.value:
    print(config.to_json_best_effort(indent=1) if _JSON.value else config)
    return 0
  if not _WORKDIR.value:
    return _usage_error("--workdir is required to train")
  if not 0 <= config.fold < config.num_folds:
    return _usage_error(f"--config.fold={config.fold} is not in 0..{config.num_folds - 1}")
  with console.sigterm_as_interrupt() as interrupt:
    try:
      summary = _train(config)
    except KeyboardInterrupt:  # Outside the loop, which saves and stops by itself.
      print("error: interrupted outside the training loop; nothing was lost: run the same "
            "command again to resume", file=sys.stderr)
      return 143 if interrupt.signum == signal.SIGTERM else 130
  if not isinstance(summary, int):  # Else an error's exit code, the error printed.
    print(json.dumps(summary, indent=1) if _JSON.value else format_summary(summary, _WORKDIR.value))
  return 0 if not isinstance(summary, int) else summary


def _train(config) -> dict[str, Any] | int:
  """The run's summary, or the exit code of an error it printed."""
  # JAX, TensorFlow and Orbax only now: --help and usage errors answer at once.
  from midog_jax.training import checkpoints
  from midog_jax.training import inputs
  from midog_jax.training import trainer
  from midog_jax.training import workdir as workdir_lib
  try:
    data = inputs.build(config)
    return trainer.train(config, _WORKDIR.value, data).summary
  except trainer.TrainingDiverged as e:
    print(f"error: {e}", file=sys.stderr)
    return 3
  except (checkpoints.CheckpointError, workdir_lib.WorkdirInUse, workdir_lib.WorkdirMismatch,
          FileNotFoundError, ValueError, OSError) as e:
    logging.debug("Traceback of the error:", exc_info=True)  # With --verbosity=1.
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(console.absl_main(main, __name__, __doc__))
