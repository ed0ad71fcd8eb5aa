"""TFDS builder of MIDOG++: `tfds build midogpp --imports tfds_midogpp`."""

from tfds_midogpp.midogpp.midogpp_dataset_builder import Builder  # Registers `midogpp`.

__all__ = ["Builder"]
