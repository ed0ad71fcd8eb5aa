"""One GPU: the reference's batch 12 and learning rate, in bf16 (the paper's protocol).

  --config configs/gpu.py                       # all tumour types
  --config configs/gpu.py:single_domain=canine_lymphoma
  --config configs/gpu.py:leave_one_out=human_melanoma
A larger batch that fills a big GPU better, but is not the paper's
protocol: configs/gpu_large_batch.py.
"""

from configs import common


def get_config(experiment: str | None = None):
  return common.for_accelerator(common.experiment_config(experiment))
