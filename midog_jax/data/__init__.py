"""The data stage: from the MIDOG++ files to batches on the devices.

Reading the dataset:
  annotations     MIDOG++.json + datasets_xvalidation.csv -> cases (the real files' names and quirks)
  domain_stats    the paper's Table 2 per domain
  folds           the reference's cross-validation folds
  records         TFRecord shards read by byte offset, without TensorFlow
  dataset         the built `midogpp` TFDS dataset: case metadata and decoded ROIs
  roi_io          region-of-interest TIFFs: read, write, resolution
  roi_store       decoded ROIs in RAM (RoiCache) or on disk, memory-mapped (DecodedStore);
                  each case's stain statistics beside them (StainStore)
  normalization   tissue mask, per-image tissue statistics, the run's z-score normalisation
  synthetic       a synthetic MIDOG++ in the real formats
  synthetic_slides  synthetic whole-slide images (tiled pyramids, SVS) with their ground truth
  slide_reader    whole-slide images window by window: OpenSlide's formats and TIFF ROIs,
                  µm/px, resampling to the training resolution, tissue mask, --roi
  stain           stain maths on the device and the host: colour deconvolution, HED jitter,
                  Macenko, Reinhard, RandStainNA; a run's stain.json (RunStain)

Feeding training:
  sampling        the reference's guided patch sampling, as pure functions of a seed
  crops           host-side crops out of decoded ROIs (worker threads, fixed object slots)
  input_pipeline  plans -> host crops -> global jax.Arrays over the mesh
  augment         fastai v1's augmentation on the device, inside the jitted step

Add an augmentation in `augment` (a field of `AugmentConfig` with its
`from_config` line, applied in `augment_image`); see README.md. Nothing here
imports the model, training, detection or evaluation stages.
"""
