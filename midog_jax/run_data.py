"""What a training run reads: its cases, folds, normalisation and inputs.

The bridge between the `midogpp` TFDS dataset and the trainer: selects the
experiment's cases, cuts the reference's folds, computes the normalisation
over the training cases' tissue, and measures validation AP on full ROIs.
"""

from __future__ import annotations

import logging

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from midog_jax import augment
from midog_jax import dataset
from midog_jax import folds as folds_lib
from midog_jax import inference
from midog_jax import input_pipeline
from midog_jax import metrics
from midog_jax import patches
from midog_jax import trainer


def validation_ap_fn(config: ml_collections.ConfigDict, cases, cache: patches.RoiCache,
                     normalization):
  """(graphdef, state) -> AP of mitotic figures over full validation ROIs.

  Each host detects with its own devices on every validation case, so no
  collectives are needed between hosts.
  """
  local_mesh = Mesh(np.array(jax.local_devices()), ("data",))
  batch = max(local_mesh.size, config.eval.batch_size // local_mesh.size * local_mesh.size)
  detectors = {}

  def validation_ap(graphdef, state) -> float:
    if "fn" not in detectors:
      detectors["fn"] = inference.make_detector(
          graphdef, normalization, config.patch_size, config.eval.max_detections_per_window,
          config.eval.score_threshold, mesh=local_mesh)
    local = jax.tree.map(lambda x: x.addressable_data(0), (state.params, state.batch_stats))
    scored = []
    for c in cases:
      xy, scores = inference.detect_image(
          cache.get(c.case_id), detectors["fn"], *local, config.patch_size, batch,
          progress=False)
      scored.append(metrics.ScoredCase(c.mitotic_figures, xy, scores, c.um_per_px))
    ap = metrics.average_precision(scored)
    return 0.0 if np.isnan(ap) else ap

  return validation_ap


def check_patch_size(patch_size: int, cases) -> None:
  """A patch must fit in some image; otherwise training sees only padding."""
  largest = max(cases, key=lambda c: min(c.width, c.height))
  if patch_size > min(largest.width, largest.height):
    raise ValueError(
        f"patch_size {patch_size} is larger than every image of the experiment (the largest "
        f"is {largest.width} x {largest.height} px); choose patch_size <= "
        f"{min(largest.width, largest.height)}")


def build(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> trainer.RunData:
  """The run's data for `config` (tumour types, fold, sampling, cache)."""
  all_train = dataset.read_cases(config.data_dir, "train")
  selected = dataset.select_cases(all_train, tumor_types=config.tumor_types)
  train_names, valid_names = folds_lib.fold(selected, config.tumor_types, config.fold,
                                              config.num_folds, config.fold_seed)
  train_cases = dataset.select_cases(selected, file_names=train_names)
  valid_cases = dataset.select_cases(selected, file_names=valid_names)
  logging.info("%s fold %d: %d training and %d validation cases.", config.experiment,
               config.fold, len(train_cases), len(valid_cases))
  check_patch_size(config.patch_size, selected)
  norm = dataset.normalization_of(train_cases)
  reader = dataset.RoiReader(config.data_dir)
  by_id = {c.case_id: c for c in selected}
  cache = patches.RoiCache(lambda i: reader(by_id[i]), config.cache_bytes)
  common = dict(patch_size=config.patch_size, global_batch_size=config.batch_size,
                seed=config.seed, guided_fraction=config.guided_fraction, mesh=mesh,
                cache=cache, prefetch=config.prefetch, window=config.stream_window)
  max_objects = patches.max_objects_in_window(
      input_pipeline.sampled_cases(selected), augment.crop_size(config.patch_size))
  train_input = input_pipeline.PatchInput(
      train_cases, None, patches_per_epoch=config.train_patches_per_epoch,
      max_objects=max_objects, **common)
  valid_input = input_pipeline.PatchInput(
      valid_cases, None, patches_per_epoch=config.valid_patches_per_epoch,
      max_objects=max_objects, validation=True, **common)
  for name, pipe in (("train_patches_per_epoch", train_input),
                     ("valid_patches_per_epoch", valid_input)):
    try:
      pipe.steps_per_epoch  # Checked now, not after the first epoch.
    except ValueError as e:
      raise ValueError(f"{e}; raise {name} or lower batch_size") from None
  return trainer.RunData(
      train=train_input, valid=valid_input, normalization=norm,
      validation_ap=(validation_ap_fn(config, valid_cases, cache, norm)
                     if config.eval.every_epochs > 0 else None),
      meta={"experiment": config.experiment, "fold": config.fold,
            "tumor_types": config.tumor_types,
            "train": [c.file_name for c in train_cases],
            "valid": [c.file_name for c in valid_cases]})
