"""A tiny configuration: minutes on a 2-core CPU, on a synthetic MIDOG++.

The same code path as a real run, with small patches, few epochs and a
learning rate for a network trained from scratch (no ImageNet weights).
`configs/demo.py` trains on all tumour types; `configs/demo.py:<tumour type>`
(e.g. `configs/demo.py:canine_lymphoma`) on that type alone, as
`configs/single_domain.py:<tumour type>` does at full scale.
"""

from configs import default
from midog_jax import domains


def get_config(tumor_type: str | None = None):
  config = default.get_config()
  if tumor_type:
    slug = domains.tumor_type(tumor_type).slug
    config.experiment = f"single_{slug}"
    config.tumor_types = slug
  else:
    config.experiment = "all_domains"  # The all-tumour-types experiment, at demo scale.
    config.tumor_types = "all"
  config.patch_size = 128
  config.batch_size = 8
  config.train_patches_per_epoch = 160
  config.valid_patches_per_epoch = 32
  config.num_epochs = 12
  config.cache_bytes = 1 << 30
  config.stream_window = 1
  config.optim.max_lr = 1e-3
  config.model.body_weights = "none"  # From scratch: no download for the demo.
  config.eval.batch_size = 8
  # 32 validation patches of 128 px hold too few mitotic figures for the
  # reference's patch AP (it skips patches without a detection, figures and
  # all, and saturates at 1.0): select by the scorer's AP on the full
  # validation ROIs, which counts every missed figure.
  config.eval.selection = "roi_ap"
  config.log_every_steps = 5
  # The synthetic MIDOG++ that `python -m midog_jax.demo` writes and builds.
  config.synthetic = dict(cases_per_domain=6, width=512, height=384, density_scale=40.0,
                          seed=0)
  return config
