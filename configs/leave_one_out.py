"""Train on all tumour types but one: `--config configs/leave_one_out.py:human_melanoma`."""

from configs import default
from midog_jax import domains


def get_config(tumor_type: str | None = None):
  tumor_type = tumor_type or "human_breast_carcinoma"
  config = default.get_config()
  left_out = domains.tumor_type(tumor_type).slug
  config.experiment = f"without_{left_out}"
  config.tumor_types = ",".join(s for s in domains.TUMOR_SLUGS if s != left_out)
  return config
