"""TFDS's own builder test on `dummy_data/` (made by midog_jax.synthetic)."""

import tensorflow_datasets as tfds

from tfds_midogpp.midogpp import midogpp_dataset_builder


class MidogppTest(tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = midogpp_dataset_builder.Builder
  SPLITS = {"train": 10, "test": 10}  # Two cases per domain, one in each split.


if __name__ == "__main__":
  tfds.testing.test_main()
