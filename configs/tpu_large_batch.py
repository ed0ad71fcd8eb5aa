"""A Cloud TPU slice (e.g. v5e-8): batch 128, bf16, lr x sqrt(128/12): NOT the paper's protocol.

  --config configs/tpu_large_batch.py[:single_domain=<type> | :leave_one_out=<type>]
The batch is split over every chip of every host (`jax.distributed`). The
larger batch changes BatchNorm statistics and the optimisation.
"""

from configs import common


def get_config(experiment: str | None = None):
  return common.for_accelerator(common.experiment_config(experiment), batch_size=128)
