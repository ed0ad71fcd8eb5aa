"""Trains one (experiment, fold) run; running it again resumes.

  python -m midog_jax.train --config configs/default.py --workdir W \\
      [--config.data_dir=D] [--config.fold=0] [--config.num_epochs=200]
  python -m midog_jax.train --config configs/single_domain.py:canine_lymphoma --print_config
  python -m midog_jax.train --member "--config C --workdir W0 --config.fold=0" \\
      --member "--config C --workdir W1 --config.fold=1"

Every field of the configuration can be set with --config.FIELD=VALUE;
--print_config prints the resolved configuration (the file with those
settings) and exits without training. Repeated --member options train
their runs together in one program (a run group, training/group.py), each
written as alone. Each run ends with a short table of its result (--json:
the same as JSON). Progress is a bar on a terminal and a line every 30 s in
a log file; --verbosity=1 (-v 1) adds debug lines and other libraries'
information, --verbosity=-1 keeps only warnings.
"""

from __future__ import annotations

import json
import logging
import shlex
import signal
import sys
from typing import Any, Sequence

from absl import flags
from absl import logging as absl_logging  # noqa: F401  Defines --verbosity (-v).
from ml_collections import config_flags

from midog_jax import commands
from midog_jax import console
from midog_jax.training.metric_writer import format_summary

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
_MEMBER = flags.DEFINE_multi_string("member", None, "")  # Help below, without absl's note.
flags.FLAGS["member"].help = ("A run of a run group, as its own options (\"--config F --workdir "
                              "W ...\"); repeated, one per run of the group.")


def _usage_error(message: str) -> int:
  print(f"error: {message} (see python -m midog_jax.train --help)", file=sys.stderr)
  return 2


def main(argv: Sequence[str]) -> int:
  """Trains with the parsed flags (also callable by `absl.app.run`)."""
  if len(argv) > 1:
    return _usage_error(f"unexpected arguments {' '.join(argv[1:])}")
  with console.logging_to_stderr(commands.absl_verbosity()):
    return _main()


def _main() -> int:
  config = _CONFIG.value
  if _MEMBER.value:  # A run group: each run's options are its --member.
    return (_report(lambda: _train(None)) if config is None and not _WORKDIR.value else
            _usage_error("--member replaces --config and --workdir: give each run a --member"))
  if config is None:
    return _usage_error("--config is required, e.g. --config configs/default.py")
  try:
    config.fold  # ml_collections defers a config file's load error to the first access.
  except OSError as e:
    return _usage_error(str(e))
  if _PRINT_CONFIG.value:
    print(commands.config_text(config, as_json=_JSON.value))
    return 0
  if not _WORKDIR.value:
    return _usage_error("--workdir is required to train")
  if not 0 <= config.fold < config.num_folds:
    return _usage_error(f"--config.fold={config.fold} is not in 0..{config.num_folds - 1}")
  return _report(lambda: _train(config))


def _report(train) -> int:
  """Runs `train()` and prints each run's result; the exit code."""
  with console.sigterm_as_interrupt() as interrupt:
    try:
      results = train()
    except KeyboardInterrupt:  # Outside the loop, which saves and stops by itself.
      print("error: interrupted outside the training loop; nothing was lost: run the same "
            "command again to resume", file=sys.stderr)
      return 143 if interrupt.signum == signal.SIGTERM else 130
  if isinstance(results, int): return results  # An error's exit code, the error printed.
  print(json.dumps(results[0][1] if _CONFIG.value else [s for _, s in results], indent=1)
        if _JSON.value else "\n\n".join(format_summary(s, w) for w, s in results))
  return 0


def _train(config) -> list[tuple[str, dict[str, Any]]] | int:
  """[(workdir, summary)] of the run or the group (config None), or an error's exit code."""
  # JAX, TensorFlow and Orbax only now: --help and usage errors answer at once.
  from midog_jax.training import checkpoints
  from midog_jax.training import group
  from midog_jax.training import inputs
  from midog_jax.training import trainer
  from midog_jax.training import workdir as workdir_lib
  try:
    if config is not None:
      return [(_WORKDIR.value, trainer.train(config, _WORKDIR.value, inputs.build(config)).summary)]
    configs, workdirs = group.members([shlex.split(m) for m in _MEMBER.value])
    results = group.train_group(configs, workdirs, [inputs.build(c) for c in configs])
    return [(w, r.summary) for w, r in zip(workdirs, results)]
  except trainer.TrainingDiverged as e:
    print(f"error: {e}", file=sys.stderr)
    return 3
  except (checkpoints.CheckpointError, workdir_lib.WorkdirInUse, workdir_lib.WorkdirMismatch,
          FileNotFoundError, ValueError, OSError) as e:
    logging.debug("Traceback of the error:", exc_info=True)  # With --verbosity=1.
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(commands.absl_main(main, __name__, __doc__))
