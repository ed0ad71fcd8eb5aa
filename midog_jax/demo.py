"""The whole system on a synthetic MIDOG++, in one command.

  python -m midog_jax.demo [--workdir midog_demo] [--config configs/demo.py[:<tumour type>]]

Writes a synthetic MIDOG++ in the real formats (all 10 domains), builds it
with the real TFDS builder, trains with the real trainer, detects on the
test split with the real detector (threshold chosen on the validation
fold), scores it as the MIDOG challenge does and writes the report: a table
per tumour type, heatmap and overlay PNGs, and WORKDIR/summary.json.
Re-running reuses every stage already done. The same command runs on a GPU
or TPU. Output goes to ./midog_demo unless --workdir says otherwise. The
seeds are fixed: the same machine, core count and JAX version give the same
numbers; another one gives somewhat different ones (see README.md).
--config.FIELD=VALUE sets any field of the configuration; --verbosity=1
(-v 1) shows debug lines and other libraries' information.
"""

from __future__ import annotations

import os
import sys

from absl import flags
from absl import logging as absl_logging  # noqa: F401  Defines --verbosity (-v).
from ml_collections import config_flags

from midog_jax import commands
from midog_jax import console
from midog_jax.evaluation import end_to_end

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "demo.py")
_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Training config (configs/demo.py:<tumour type> for one type).",
    lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", "midog_demo", "Where data, run and report go "
                               "(relative to the current directory).")
_OVERLAYS = flags.DEFINE_integer("overlays", 4, "Test images drawn with their detections.")


def main(argv) -> int:
  """Runs the demo with the parsed flags (also callable by `absl.app.run`)."""
  if len(argv) > 1:
    print(f"error: unexpected arguments {' '.join(argv[1:])} (see python -m midog_jax.demo "
          "--help)", file=sys.stderr)
    return 2
  with console.logging_to_stderr(commands.absl_verbosity()):
    end_to_end.run(_CONFIG.value, _WORKDIR.value, _OVERLAYS.value)
  return 0


if __name__ == "__main__":
  sys.exit(commands.absl_main(main, __name__, __doc__))
