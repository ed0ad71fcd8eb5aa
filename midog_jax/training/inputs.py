"""What a training run reads: its cases, folds, normalisation, inputs and selection metric.

The bridge between the `midogpp` TFDS dataset and the trainer: selects the
experiment's cases (tumour types, and domains with `config.domains`), cuts
the reference's folds, computes the normalisation over the training cases'
tissue, builds the input pipelines and the selection metric
`config.eval.selection` names. With a stain switch it also gathers each
case's stain statistics (once per dataset, `roi_store.StainStore`) and fits
the run's `stain.RunStain` (stain.json) on the training cases; crops are
then normalised on the device, and the validation ROIs the selection metric
detects on are normalised on the host, the way detection normalises images.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable

import ml_collections
from jax.sharding import Mesh

from midog_jax import console
from midog_jax import domains
from midog_jax.data import augment
from midog_jax.data import crops
from midog_jax.data import dataset
from midog_jax.data import folds as folds_lib
from midog_jax.data import input_pipeline
from midog_jax.data import normalization as normalization_lib
from midog_jax.data import roi_store
from midog_jax.data import stain as stain_lib
from midog_jax.model import backbones
from midog_jax.training import selection


@dataclasses.dataclass
class RunData:
  """What a run trains and validates on (see `build`)."""
  train: Any  # input_pipeline.PatchInput, training plans.
  valid: Any  # input_pipeline.PatchInput, the fixed validation patches.
  normalization: normalization_lib.Normalization
  # (graphdef, state, epoch) -> the selection metric (see `eval.selection`).
  validation_ap: Callable[[Any, Any, int], float] | None
  meta: dict[str, Any]  # Case lists etc., written with the run.

  def run_files(self) -> dict[str, Any]:
    """{file name: JSON}: what the data contributes to a run's identity (written at its first start)."""
    files = {"cases.json": self.meta, "normalization.json": self.normalization.to_json()}
    if self.normalization.stain is not None:  # Runs without a stain switch keep their files.
      files["stain.json"] = self.normalization.stain.to_json()
    return files


def check_patch_size(patch_size: int, cases) -> None:
  """A patch must fit in some image; otherwise training sees only padding."""
  largest = max(cases, key=lambda c: min(c.width, c.height))
  if patch_size > min(largest.width, largest.height):
    raise ValueError(
        f"patch_size {patch_size} is larger than every image of the experiment (the largest "
        f"is {largest.width} x {largest.height} px); choose patch_size <= "
        f"{min(largest.width, largest.height)}")


def _decoded_folder(config: ml_collections.ConfigDict, reader: dataset.RoiReader) -> str:
  return config.decoded_dir or os.path.join(reader.folder, roi_store.FOLDER)


def roi_cache(config: ml_collections.ConfigDict, reader: dataset.RoiReader,
              cases) -> roi_store.RoiCache:
  """Decoded ROIs for the input: in RAM, or decoded once to disk and mapped."""
  by_id = {c.case_id: c for c in cases}
  folder = _decoded_folder(config, reader)
  if roi_store.choose(config.roi_store, cases, config.cache_bytes, folder) == "ram":
    return roi_store.RoiCache(lambda i: reader(by_id[i]), config.cache_bytes)
  store = roi_store.DecodedStore(reader, folder)
  # Mapped files hold page cache, not the process's memory: keep them all open.
  return roi_store.RoiCache(lambda i: store(by_id[i]), roi_store.decoded_bytes(cases))


def stain_switches(config: ml_collections.ConfigDict, folder: str, train_cases, cases,
                   cache: roi_store.RoiCache
                   ) -> tuple[stain_lib.RunStain | None, dict[int, Any] | None]:
  """The run's `RunStain` and each case's normalisation params (None: no switch).

  The statistics of every case of `cases` are read from (or computed into)
  `folder`'s StainStore, decoding through `cache` where they are new.
  """
  aug = augment.AugmentConfig.from_config(config)
  if aug.stain_normalization == "none" and aug.randstainna == "none":
    return None, None
  store = roi_store.StainStore(folder)
  stats = {c.case_id: store.get(c, lambda c=c: cache.get(c.case_id))
           for c in console.progress(cases, len(cases), "stain statistics", "case")}
  if store.computed:
    logging.info("Stain statistics of %d case(s) computed into %s.", store.computed, folder)
  run = stain_lib.RunStain.fit(aug.stain_normalization, aug.randstainna,
                               [stats[c.case_id] for c in train_cases])
  if run.normalization == "none":
    return run, None
  return run, {i: run.case_params(s) for i, s in stats.items()}


def _normalised_cache(cache: roi_store.RoiCache, run: stain_lib.RunStain, params, cases,
                      budget: int) -> roi_store.RoiCache:
  """The ROIs of `cases` normalised on the host, as detection normalises images."""
  return roi_store.RoiCache(
      lambda i: stain_lib.normalize_image(cache.get(i), params[i], run.normalization),
      min(budget, roi_store.decoded_bytes(cases)))


def build(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> RunData:
  """The run's data for `config` (tumour types, fold, sampling, cache)."""
  # Names looked up in the tables fail here, before any data is read.
  backbones.get(config.model.get("backbone"))
  augment.AugmentConfig.from_config(config)
  selection.check_name(config.eval.selection)
  all_train = dataset.read_cases(config.data_dir, "train")
  try:
    domain_ids = domains.parse_domain_ids(config.get("domains", "all"))
  except KeyError as e:
    raise ValueError(f"domains {config.domains!r}: {e.args[0]}") from None
  selected = dataset.select_cases(all_train, tumor_types=config.tumor_types,
                                  domain_ids=domain_ids)
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
  run_stain, stain_params = stain_switches(config, _decoded_folder(config, reader), train_cases,
                                           selected, cache)
  selection_cache = cache
  if run_stain is not None:
    norm = dataclasses.replace(norm, stain=run_stain)
  if stain_params is not None:
    selection_cache = _normalised_cache(cache, run_stain, stain_params, valid_cases,
                                        config.cache_bytes)
  common = dict(patch_size=config.patch_size, global_batch_size=config.batch_size,
                seed=config.seed, guided_fraction=config.guided_fraction, mesh=mesh,
                cache=cache, prefetch=config.prefetch, window=config.stream_window,
                workers=config.input_workers, stain_params=stain_params)
  max_objects = crops.max_objects_in_window(
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
  # The selection metrics crop or detect on these ROIs themselves: normalised here.
  context = selection.Context(config, valid_cases, selection_cache, norm, mesh, max_objects)
  metric = selection.make_metric(config.eval.selection, context)  # Checks the name too.
  meta = {"experiment": config.experiment, "fold": config.fold,
          "tumor_types": config.tumor_types}
  if domain_ids is not None:  # Only then: other runs keep their cases.json.
    meta["domains"] = list(domain_ids)
  return RunData(
      train=train_input, valid=valid_input, normalization=norm,
      validation_ap=metric if config.eval.every_epochs > 0 else None,
      meta={**meta, "train": [c.file_name for c in train_cases],
            "valid": [c.file_name for c in valid_cases]})
