"""A built synthetic `midogpp` and a tiny training config for the tests."""

import pathlib

import tensorflow_datasets as tfds

from configs import demo
from midog_jax.data import synthetic
from tfds_midogpp.midogpp import midogpp_dataset_builder as builder_lib


def build_synthetic(root: pathlib.Path, cases_per_domain: int = 3, width: int = 192,
                    height: int = 160, num_shards: int | None = 2) -> str:
  """Writes and builds a synthetic midogpp under `root`; returns the data dir.

  Several shards by default, as the real splits always have: record order
  then differs from case order, which the readers must not depend on.
  """
  manual = root / "manual"
  if not manual.exists():
    synthetic.write_dataset(str(manual), cases_per_domain, width, height, seed=4,
                            density_scale=150, progress=False)
  return build_layout(manual, root / f"tfds-{num_shards}-shards", num_shards)


def build_layout(manual: pathlib.Path, data: pathlib.Path, num_shards: int | None) -> str:
  """Builds the TIFFs in `manual` into `data` with `num_shards` shards per split."""
  builder_lib.Builder(data_dir=str(data)).download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual),
                                                   num_shards=num_shards))
  return str(data)


# The network of the tests that check mechanics (resume, sharding, outputs), not the
# reference's architecture: ResNet18 at a quarter of its width, FPN and heads at 32.
# A sixteenth of the convolutions' work and of the checkpoints' bytes.
TEST_NETWORK = {"model.backbone": "resnet18_narrow", "model.channels": 32}


def network_flags(prefix: str = "--config.") -> list[str]:
  """TEST_NETWORK as command-line overrides: `--config.K=V` (train, demo) or, with
  prefix "", `K=V` (experiments --set)."""
  return [f"{prefix}{k}={v}" for k, v in TEST_NETWORK.items()]


def use_test_network(config) -> None:
  """Sets TEST_NETWORK in `config`."""
  for key, value in TEST_NETWORK.items():
    section, field = key.split(".")
    config[section][field] = value


def tiny_config(data_dir: str, **overrides):
  config = demo.get_config()
  use_test_network(config)
  config.data_dir = data_dir
  config.patch_size = 64
  config.batch_size = 8
  config.train_patches_per_epoch = 32
  config.valid_patches_per_epoch = 8
  config.num_epochs = 2
  config.eval.every_epochs = 0
  config.prefetch = 0
  for k, v in overrides.items():
    node = config
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return config
