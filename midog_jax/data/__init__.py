"""The data stage: from the MIDOG++ files to batches on the devices.

Reading the dataset:
  annotations     MIDOG++.json + datasets_xvalidation.csv -> cases (the real files' names and quirks)
  domain_stats    the paper's Table 2 per domain
  folds           the reference's cross-validation folds
  records         TFRecord shards read by byte offset, without TensorFlow
  dataset         the built `midogpp` TFDS dataset: case metadata and decoded ROIs
  roi_io          region-of-interest TIFFs: read, write, resolution
  roi_store       decoded ROIs in RAM (RoiCache) or on disk, memory-mapped (DecodedStore)
  normalization   tissue mask, per-image tissue statistics, the run's z-score normalisation
  synthetic       a synthetic MIDOG++ in the real formats

Feeding training:
  sampling        the reference's guided patch sampling, as pure functions of a seed
  crops           host-side crops out of decoded ROIs (worker threads, fixed object slots)
  input_pipeline  plans -> host crops -> global jax.Arrays over the mesh
  augment         fastai v1's augmentation on the device, inside the jitted step

Add an augmentation in `augment` (a field of `AugmentConfig` with its
`from_config` line, applied in `augment_image`); see README.md. Nothing here
imports the model, training, detection or evaluation stages.
"""
