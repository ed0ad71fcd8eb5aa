"""Trains one (experiment, fold) run; running it again resumes.

  python -m midog_jax.train --config configs/default.py --workdir W \
      [--config.data_dir=D] [--config.fold=0] [--config.num_epochs=200]
"""

from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from midog_jax import checkpoints
from midog_jax import run_data
from midog_jax import trainer
from midog_jax import workdir

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A configs/*.py file with get_config(); fields overridable as --config.x=y.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and logs go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  # Orbax and TFDS log every step at INFO; keep the terminal to the progress bar.
  absl_logging.set_verbosity(absl_logging.WARNING)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  config = _CONFIG.value
  if not 0 <= config.fold < config.num_folds:
    raise app.UsageError(f"--config.fold={config.fold} is not in 0..{config.num_folds - 1}")
  try:
    data = run_data.build(config)
    summary = trainer.train(config, _WORKDIR.value, data).summary
  except trainer.TrainingDiverged as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)
  except (checkpoints.CheckpointError, workdir.WorkdirInUse, workdir.WorkdirMismatch,
          FileNotFoundError, ValueError, OSError) as e:
    absl_logging.debug("Traceback of the error:", exc_info=True)  # With --verbosity=1.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(summary, indent=1))


if __name__ == "__main__":
  app.run(main)
