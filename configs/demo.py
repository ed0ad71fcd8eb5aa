"""A tiny configuration: minutes on a 2-core CPU, on a synthetic MIDOG++.

The same code path as a real run, with small patches, few epochs and a
learning rate for a network trained from scratch (no ImageNet weights).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.experiment = "all_domains"  # The all-tumour-types experiment, at demo scale.
  config.patch_size = 128
  config.batch_size = 8
  config.train_patches_per_epoch = 160
  config.valid_patches_per_epoch = 32
  config.num_epochs = 8
  config.cache_bytes = 1 << 30
  config.stream_window = 1
  config.optim.max_lr = 1e-3
  config.eval.batch_size = 8
  config.log_every_steps = 5
  return config
