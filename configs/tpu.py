"""A Cloud TPU: the reference's batch 12 and learning rate, in bf16 (the paper's protocol).

  --config configs/tpu.py[:single_domain=<type> | :leave_one_out=<type>]
The global batch of 12 is split over every chip of every host, so the chip
count must divide 12 (1, 2, 3, 4, 6 or 12 chips, e.g. a v4-8 or v5e-4). On
8 chips use configs/tpu_large_batch.py (not the paper's protocol).
"""

from configs import common


def get_config(experiment: str | None = None):
  return common.for_accelerator(common.experiment_config(experiment))
