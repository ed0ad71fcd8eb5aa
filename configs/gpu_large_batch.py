"""One GPU, batch 64, bf16, learning rate x sqrt(64/12): faster, NOT the paper's protocol.

  --config configs/gpu_large_batch.py[:single_domain=<type> | :leave_one_out=<type>]
The larger batch changes BatchNorm statistics and the optimisation; results
are not directly comparable with the paper's tables (configs/gpu.py is).
"""

from configs import common


def get_config(experiment: str | None = None):
  return common.for_accelerator(common.experiment_config(experiment), batch_size=64)
