"""What a training run reads: its cases, folds, normalisation and inputs.

The bridge between the `midogpp` TFDS dataset and the trainer: selects the
experiment's cases, cuts the reference's folds, computes the normalisation
over the training cases' tissue, and measures validation AP on full ROIs.
"""

from __future__ import annotations

import logging
import os

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from midog_jax import annotations
from midog_jax import augment
from midog_jax import dataset
from midog_jax import decoded_store
from midog_jax import folds as folds_lib
from midog_jax import inference
from midog_jax import input_pipeline
from midog_jax import metrics
from midog_jax import patches
from midog_jax import selection
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

  def validation_ap(graphdef, state, epoch: int = 0) -> float:
    del epoch  # The same full ROIs every epoch.
    if "fn" not in detectors:
      detectors["fn"] = inference.make_detector(
          graphdef, normalization, config.patch_size, config.eval.max_detections_per_window,
          config.eval.score_threshold, mesh=local_mesh)
    local = jax.tree.map(lambda x: x.addressable_data(0), (state.params, state.batch_stats))
    scored = []
    for c in cases:
      xy, scores = inference.detect_image(
          cache.get(c.case_id), detectors["fn"], *local, config.patch_size, batch,
          min_overlap=config.eval.window_min_overlap, progress=False)
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


_SELECTION_STREAM = 2  # Seeds the selection patches apart from training's.


def reference_selection_fn(config: ml_collections.ConfigDict, cases, cache: patches.RoiCache,
                           normalization, mesh: Mesh | None, max_objects: int):
  """(graphdef, state, epoch) -> the reference's AP on this epoch's validation patches.

  As the reference's `PascalVOCMetricByDistance` (see `selection`): patches
  drawn afresh each epoch by the guided sampler, detections of the centre
  patch, Pascal VOC AP at IoU 0.3 pooled over the epoch's patches.
  """
  seed = int(np.random.SeedSequence(config.seed, spawn_key=(_SELECTION_STREAM,))
             .generate_state(1)[0] >> 1)
  pipe = input_pipeline.PatchInput(
      cases, None, patch_size=config.patch_size,
      patches_per_epoch=config.valid_patches_per_epoch, global_batch_size=config.batch_size,
      seed=seed, guided_fraction=config.guided_fraction, mesh=mesh, cache=cache, prefetch=0,
      window=config.stream_window, max_objects=max_objects, workers=config.input_workers)
  margin = augment.margin(config.patch_size)
  fns = {}

  def selection_ap(graphdef, state, epoch: int = 0) -> float:
    if "fn" not in fns:
      fns["fn"] = trainer.make_patch_detector(graphdef, config, normalization, pipe.mesh)
    per_epoch = pipe.steps_per_epoch
    entries = []
    for host in pipe.host_batches(epoch * per_epoch, epochs=epoch + 1):
      boxes, scores = fns["fn"](state, pipe.to_global(host))
      boxes, scores = _all_hosts(boxes), _all_hosts(scores)
      centers, labels, valid = (_all_hosts(host[k]) for k in ("centers", "labels", "valid"))
      for b in range(len(scores)):
        mitotic = valid[b] & (labels[b] == annotations.MITOTIC_FIGURE)
        gt = selection.ground_truth_boxes(centers[b][mitotic] - margin, config.patch_size)
        entries.append(selection.patch_entry(boxes[b], scores[b], gt))
    return selection.voc_ap(entries)

  return selection_ap


def _all_hosts(x) -> np.ndarray:
  """Every host's rows (a global array, or this host's NumPy rows), in order."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def roi_cache(config: ml_collections.ConfigDict, reader: dataset.RoiReader,
              cases) -> patches.RoiCache:
  """Decoded ROIs for the input: in RAM, or decoded once to disk and mapped."""
  by_id = {c.case_id: c for c in cases}
  folder = config.decoded_dir or os.path.join(reader.folder, decoded_store.FOLDER)
  if decoded_store.choose(config.roi_store, cases, config.cache_bytes, folder) == "ram":
    return patches.RoiCache(lambda i: reader(by_id[i]), config.cache_bytes)
  store = decoded_store.DecodedStore(reader, folder)
  # Mapped files hold page cache, not the process's memory: keep them all open.
  return patches.RoiCache(lambda i: store(by_id[i]), decoded_store.decoded_bytes(cases))


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
  cache = roi_cache(config, reader, selected)
  common = dict(patch_size=config.patch_size, global_batch_size=config.batch_size,
                seed=config.seed, guided_fraction=config.guided_fraction, mesh=mesh,
                cache=cache, prefetch=config.prefetch, window=config.stream_window,
                workers=config.input_workers)
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
  selection_fns = {
      "reference": lambda: reference_selection_fn(config, valid_cases, cache, norm, mesh,
                                                  max_objects),
      "roi_ap": lambda: validation_ap_fn(config, valid_cases, cache, norm)}
  if config.eval.selection not in selection_fns:
    raise ValueError(f"eval.selection {config.eval.selection!r}: expected one of "
                     f"{sorted(selection_fns)}")
  return trainer.RunData(
      train=train_input, valid=valid_input, normalization=norm,
      validation_ap=(selection_fns[config.eval.selection]()
                     if config.eval.every_epochs > 0 else None),
      meta={"experiment": config.experiment, "fold": config.fold,
            "tumor_types": config.tumor_types,
            "train": [c.file_name for c in train_cases],
            "valid": [c.file_name for c in valid_cases]})
