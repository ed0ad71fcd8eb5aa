"""A trained run ready to detect: its weights, normalisation and operating point.

`load_run` restores a run's best (or a given) checkpoint into the shapes of
its own configuration, without TensorFlow or the dataset. `Detector` runs
the jitted sliding-window detector on every local device; `images_from_files`
and `split_images` feed it TIFFs or a dataset split. A run trained with a
stain normalisation (its stain.json) has every image normalised to its
target first, from the image's own stain estimate, as training did.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable, Iterator, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx

from midog_jax import atomic
from midog_jax import console
from midog_jax import sharding
from midog_jax.data import dataset
from midog_jax.data import normalization as normalization_lib
from midog_jax.data import roi_io
from midog_jax.data import stain as stain_lib
from midog_jax.detection import sliding_window
from midog_jax.model import retinanet
from midog_jax.training import optim
from midog_jax.training import steps

DEFAULT_OPERATING_POINT = 0.5  # The reference's `detect_thresh`.


def _checkpoints():
  """The checkpoint module, imported only for training runs: Orbax is slow to import
  and a bundle (`bundle.py`) loads without it."""
  from midog_jax.training import checkpoints  # pylint: disable=g-import-not-at-top
  return checkpoints


@dataclasses.dataclass
class LoadedRun:
  """A trained network with what detection needs from its run."""
  workdir: str
  step: int
  config: ml_collections.ConfigDict
  normalization: normalization_lib.Normalization
  graphdef: Any
  params: Any
  batch_stats: Any


def checkpoint_dir(workdir: str | None, checkpoint: str | None) -> tuple[str, str]:
  """(run workdir, checkpoint step directory): the best epoch by default."""
  if checkpoint:
    checkpoint = os.path.abspath(checkpoint.rstrip("/"))
    workdir = os.path.dirname(os.path.dirname(checkpoint))
    if not (os.path.basename(checkpoint).isdigit()
            and os.path.exists(os.path.join(workdir, "config.json"))):
      raise FileNotFoundError(
          f"{checkpoint}: expected WORKDIR/checkpoints/STEP with WORKDIR/config.json")
    if not os.path.isdir(checkpoint):
      steps = _checkpoints().RunCheckpoints(workdir, read_only=True).steps()
      raise FileNotFoundError(f"{checkpoint}: no such checkpoint; the run has step(s) "
                              f"{', '.join(map(str, steps)) or 'none'}")
    return workdir, checkpoint
  workdir = os.path.abspath(workdir)
  if not os.path.exists(os.path.join(workdir, "config.json")):
    raise FileNotFoundError(f"{workdir}: not a training run (no config.json)")
  ckpt = _checkpoints().RunCheckpoints(workdir, read_only=True)
  try:
    step = ckpt.best_step()
    step = ckpt.latest_step() if step is None else step
  finally:
    ckpt.close()
  if step is None:
    if ckpt.has_old_layout():
      raise FileNotFoundError(ckpt.old_layout_message())
    raise FileNotFoundError(f"{workdir}: no checkpoint in checkpoints/; "
                            "train first (python -m midog_jax.train ...)")
  return workdir, os.path.join(workdir, "checkpoints", str(step))


def load_run(workdir: str | None = None, checkpoint: str | None = None) -> LoadedRun:
  """Loads config, normalisation and weights of a run (best epoch by default).

  By default a damaged best checkpoint is passed over, with a warning, for the
  best intact one; a damaged `checkpoint` named by the user fails, naming it.
  """
  workdir, ckpt = checkpoint_dir(workdir, checkpoint)
  config = ml_collections.ConfigDict(atomic.read_json(os.path.join(workdir, "config.json")))
  norm = normalization_lib.Normalization.load(os.path.join(workdir, "normalization.json"))
  norm = with_stain(norm, os.path.join(workdir, "stain.json"))
  model_config = retinanet.RetinaNetConfig.from_config(config, pretrained=False)
  # The optimiser state is part of the checkpoint's tree; its length does not matter.
  tx = optim.from_config(config, total_steps=1)
  graphdef, abstract = steps.abstract_train_state(
      lambda: retinanet.RetinaNet(model_config, rngs=nnx.Rngs(0)), tx,
      jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  try:
    if checkpoint:
      step, restored = int(os.path.basename(ckpt)), _checkpoints().read_state(ckpt, abstract)
    else:
      found = _checkpoints().RunCheckpoints(workdir, read_only=True).restore_best(abstract)
      if found is None:  # Its steps were removed since `checkpoint_dir` looked.
        raise FileNotFoundError(f"{workdir}: no checkpoint in checkpoints/")
      step, restored = found
  except (ValueError, KeyError, TypeError) as e:  # Orbax: a tree that does not fit.
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f"{ckpt}: the checkpoint does not fit the run's config.json "
                     f"({first[:200]}); detect with the config.json it was trained with") from e
  return LoadedRun(workdir, step, config, norm, graphdef, restored.params, restored.batch_stats)


def with_stain(norm: normalization_lib.Normalization, path: str
                ) -> normalization_lib.Normalization:
  """`norm` with the run's stain.json, where it has one (runs before it have none)."""
  if not os.path.exists(path):
    return norm
  try:
    run_stain = stain_lib.RunStain.from_json(atomic.read_json(path))
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{path}: unreadable stain settings ({e}); it is written at the run's "
                     "first start: restore it from a copy of the run") from None
  return dataclasses.replace(norm, stain=run_stain)


class Detector:
  """Whole-image detection with a loaded run on every local device."""

  def __init__(self, run: LoadedRun, threshold: float | None = None, batch_size: int | None = None,
               progress: bool = False):
    mesh = sharding.make_mesh(jax.local_devices())
    per_device = max(1, (batch_size or run.config.eval.batch_size) // mesh.size)
    self.batch_size = per_device * mesh.size
    self.patch = run.config.patch_size
    self.threshold = run.config.eval.score_threshold if threshold is None else threshold
    self._fn = sliding_window.make_detector(
        run.graphdef, run.normalization, self.patch, run.config.eval.max_detections_per_window,
        self.threshold, mesh=mesh)
    self._weights = sharding.replicate((run.params, run.batch_stats), mesh)
    self.progress = progress  # A bar over each image's windows.
    self.min_overlap = run.config.eval.get("window_min_overlap", sliding_window.MIN_OVERLAP)
    self.stain = run.normalization.stain  # stain.RunStain, or None.

  def normalize(self, image: np.ndarray, params: np.ndarray | None = None) -> np.ndarray:
    """`image` stain-normalised as the run's training images were (as is without a
    stain normalisation). A whole slide's tiles pass the `params` estimated once
    from its low-resolution level (`self.stain.image_params`)."""
    return image if self.stain is None else self.stain.normalize(image, params)

  def detect_windows(self, windows: np.ndarray):
    """(centres, scores, valid) of a batch of uint8 windows: the device part alone."""
    return self._fn(*self._weights, windows)

  def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    image = self.normalize(image)
    return sliding_window.detect_image(image, self._fn, *self._weights, self.patch,
                                       self.batch_size, min_overlap=self.min_overlap,
                                       progress=self.progress)


def detect_all(detector: Detector, items: Iterable[tuple[str, np.ndarray]], total: int | None = None,
               desc: str = "detect") -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
  """(name, image, xy, scores) per image, with progress over images (a bar on a
  terminal, a line every 30 s in a log file) labelled `desc`."""
  for name, image in console.progress(items, total, desc, "image"):
    xy, scores = detector(image)
    yield name, image, xy, scores


def operating_point(run: LoadedRun, threshold: float | None) -> tuple[float, str]:
  """(threshold, where it came from): given, else chosen on the validation fold."""
  if threshold is not None:
    return threshold, "--threshold"
  for name in ("evaluation.json", "evaluation.last.json"):  # `eval --runs [--checkpoint last]`.
    path = os.path.join(run.workdir, name)
    if os.path.exists(path):
      evaluation = atomic.read_json(path)
      if evaluation.get("checkpoint_step") == run.step and evaluation.get("threshold") is not None:
        return float(evaluation["threshold"]), f"chosen on the validation fold, {name}"
  return DEFAULT_OPERATING_POINT, ("the reference's detection threshold; run `python -m "
                                   "midog_jax.eval --runs` to choose one on the validation fold")


@dataclasses.dataclass
class Images:
  """Images to detect on: (name, image) items, with what is known about them."""
  items: Iterator[tuple[str, np.ndarray]]
  total: int
  um_per_px: dict[str, float]
  truth: dict[str, Any]  # Ground-truth points by name, where known (for overlays).
  failed: dict[str, str]  # Name -> why it could not be read; filled while iterating too.


def unique_names(paths: Sequence[str]) -> list[str]:
  """Output names (file names); two inputs with one name are refused."""
  names = [os.path.basename(p) for p in paths]
  seen: dict[str, str] = {}
  for p, n in zip(paths, names):
    if n in seen:
      raise ValueError(f"{seen[n]} and {p} have the same file name {n}; outputs are keyed by "
                       "file name, so rename or copy one of them")
    seen[n] = p
  return names


def images_from_files(paths: Sequence[str], um_per_px: float | None = None) -> Images:
  """TIFF files; an unreadable one is reported in `failed`, the others still detected.

  `um_per_px` stands in for images without resolution tags.
  """
  names = unique_names(paths)
  um, failed = {}, {}
  for path, name in zip(paths, names):
    try:
      value = roi_io.read_um_per_px(path) or um_per_px
    except roi_io.RoiError as e:
      failed[name] = str(e)
      continue
    if value is None:
      raise roi_io.RoiError(f"{path}: no resolution tags; pass --um-per-px (e.g. 0.25)")
    um[name] = value
  readable = [(p, n) for p, n in zip(paths, names) if n in um]

  def items() -> Iterator[tuple[str, np.ndarray]]:
    for path, name in readable:
      try:
        image = roi_io.read_roi(path)
      except (roi_io.RoiError, OSError) as e:
        failed[name] = str(e)
        continue
      yield name, image

  return Images(items(), len(readable), um, {}, failed)


def split_cases(run: LoadedRun, data_dir: str | None, split: str) -> list:
  """A dataset split's cases; "valid" is the run's own validation fold."""
  if split != "valid":
    return dataset.read_cases(data_dir, split)
  meta_path = os.path.join(run.workdir, "cases.json")
  names = atomic.read_json(meta_path)["valid"]
  if not names:
    raise ValueError(f"{meta_path}: the run has no validation cases")
  return dataset.select_cases(dataset.read_cases(data_dir, "train"), file_names=names)


def split_images(run: LoadedRun, data_dir: str | None, split: str) -> Images:
  """A split of the `midogpp` dataset (default: the run's own data dir)."""
  data_dir = data_dir or run.config.data_dir
  cases = split_cases(run, data_dir, split)
  items = ((c.file_name, image) for c, image in dataset.iterate_rois(data_dir, cases))
  return Images(items, len(cases), {c.file_name: c.um_per_px for c in cases},
                {c.file_name: c.mitotic_figures for c in cases}, {})
