"""One GPU (H100/H200 class): batch 64, bf16, learning rate x sqrt(64/12).

  --config configs/gpu.py                       # all tumour types
  --config configs/gpu.py:single_domain=canine_lymphoma
  --config configs/gpu.py:leave_one_out=human_melanoma
For several GPUs raise the batch with `--config.batch_size` only together
with `default.for_accelerator` (see configs/tpu.py for the pattern).
"""

from configs import default


def get_config(experiment: str | None = None):
  return default.for_accelerator(default.experiment_config(experiment), batch_size=64)
