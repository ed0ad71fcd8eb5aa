"""Train on one tumour type: `--config configs/single_domain.py:canine_lymphoma`."""

from configs import default
from midog_jax import domains


def get_config(tumor_type: str | None = None):
  tumor_type = tumor_type or "human_breast_carcinoma"
  config = default.get_config()
  slug = domains.tumor_type(tumor_type).slug
  config.experiment = f"single_{slug}"
  config.tumor_types = slug
  return config
