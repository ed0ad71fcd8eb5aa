"""What the experiment and hardware configs share: experiments by name, accelerator settings.

  configs/gpu.py:single_domain=canine_lymphoma
      = for_accelerator(experiment_config("single_domain=canine_lymphoma"))
"""

import ml_collections

from configs import all_domains
from configs import leave_one_domain_out
from configs import leave_one_out
from configs import single_domain


def for_accelerator(config: ml_collections.ConfigDict, batch_size: int | None = None,
                    dtype: str = "bfloat16") -> ml_collections.ConfigDict:
  """bf16 compute (float32 parameters); optionally a larger batch.

  Without `batch_size` the reference's batch and learning rate are kept: the
  paper's protocol. With it, the learning rate grows by the square-root rule:
  Adam-family optimisers keep their training dynamics when the learning rate
  grows with the square root of the batch (Malladi et al., NeurIPS 2022,
  "On the SDEs and scaling rules for adaptive gradient algorithms"); epochs
  keep the reference's patch counts, so they take fewer, larger steps. That
  changes BatchNorm statistics and the optimisation: not the paper's protocol.
  """
  batch_size = batch_size or config.batch_size
  scale = (batch_size / config.batch_size) ** 0.5
  config.optim.max_lr *= scale
  if config.optim.discriminative is not None:
    config.optim.discriminative = tuple(lr * scale for lr in config.optim.discriminative)
  config.batch_size = batch_size
  config.model.dtype = dtype
  config.eval.batch_size = max(config.eval.batch_size, batch_size)
  return config


def experiment_config(spec: str | None) -> ml_collections.ConfigDict:
  """`None`/"all_domains", "single_domain=<type>" or "leave_one_out=<type>"."""
  kind, _, arg = (spec or "all_domains").partition("=")
  makers = {"all_domains": lambda a: all_domains.get_config(),
            "single_domain": single_domain.get_config,
            "leave_one_out": leave_one_out.get_config,
            "leave_one_domain_out": leave_one_domain_out.get_config}
  if kind not in makers or (kind != "all_domains") != bool(arg):
    raise ValueError(f"experiment {spec!r}: expected all_domains, single_domain=<tumour "
                     "type>, leave_one_out=<tumour type> or leave_one_domain_out=<domain>[,switch]")
  return makers[kind](arg) if arg else makers[kind](None)
