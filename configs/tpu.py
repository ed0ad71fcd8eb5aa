"""A Cloud TPU slice (e.g. v5e-8): global batch 128, bf16, lr x sqrt(128/12).

  --config configs/tpu.py[:single_domain=<type> | :leave_one_out=<type>]
The batch is split over every chip of every host (`jax.distributed`).
"""

from configs import default


def get_config(experiment: str | None = None):
  return default.for_accelerator(default.experiment_config(experiment), batch_size=128)
