"""Training and validation batches: plan -> host crops -> global jax.Arrays.

The host only crops (uint8 windows with the margin augmentation needs, plus
object centres, labels and a validity mask), in several worker threads;
augmentation and normalisation happen on the device inside the jitted step.
The batch at step k is a pure function of (seed, k, case list, host count),
whatever the number of workers, so a resumed run sees exactly the batches it
would have seen. Imports neither TensorFlow nor TFDS.
"""

from __future__ import annotations

import functools
import math
import queue
import threading
from typing import Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from midog_jax import sharding
from midog_jax.data import augment
from midog_jax.data import crops
from midog_jax.data import roi_store
from midog_jax.data import sampling


def sampled_cases(cases: Sequence) -> list[sampling.SampledCase]:
  """`dataset.CaseInfo` (or anything with the same fields) -> sampler cases."""
  return [sampling.SampledCase(c.case_id, c.width, c.height, c.centers, c.labels)
          for c in cases]


class PatchInput:
  """Batches of one run's cases, for training (per epoch) or validation (fixed).

  Args:
    cases: the run's cases (`dataset.CaseInfo`), in a fixed order.
    load_roi: decodes the uint8 RGB ROI of a case id.
    patch_size: patch side P; crops are `augment.crop_size(P)` wide.
    patches_per_epoch: as the reference (1000 training, 250 validation).
    global_batch_size: over all devices and hosts.
    seed: the run's seed.
    guided_fraction: share of patches placed around a mitotic figure.
    cache_bytes: host RAM for decoded ROIs (0 streams: decode on demand).
    max_objects: object slots per patch; None computes the bound from the
      data (the most objects any crop-sized window holds).
    mesh: devices to shard the batch over (axis "data"); None: all devices.
    validation: a fixed seeded set of patches instead of per-epoch plans.
    prefetch: host batches prepared ahead in a background thread.
    window: batches cropped together, each ROI fetched once per window; with
      a small cache, a larger window means fewer decodes.
    cache: share an existing ROI cache (then `load_roi`/`cache_bytes` unused).
    reuse_buffers: crop into the same host arrays every batch (twice as fast
      as fresh memory). None: only where the devices are not the CPU, since
      JAX's CPU arrays alias host memory instead of copying it.
    workers: threads cropping windows of batches at once (the batches do not
      depend on it). None or 0: `crops.default_workers()`, the cores this
      process may use, at most 8.
    stain_params: case id -> [4, 3] stain normalisation params
      (`stain.RunStain.case_params`), sent with each patch as "stain"; None:
      no stain normalisation.
  """

  def __init__(self, cases: Sequence, load_roi: Callable[[int], np.ndarray], *,
               patch_size: int, patches_per_epoch: int, global_batch_size: int,
               seed: int, guided_fraction: float = 0.5, cache_bytes: int = 8 << 30,
               max_objects: int | None = None, mesh: Mesh | None = None,
               validation: bool = False, prefetch: int = 2, window: int = 1,
               cache: roi_store.RoiCache | None = None, reuse_buffers: bool | None = None,
               workers: int | None = None,
               stain_params: Mapping[int, np.ndarray] | None = None):
    self.cases = sampled_cases(cases)
    self.patch_size, self.crop_size = patch_size, augment.crop_size(patch_size)
    self.patches_per_epoch, self.seed = patches_per_epoch, seed
    self.guided_fraction, self.validation, self.prefetch = guided_fraction, validation, prefetch
    self.window = window
    self.workers = workers or crops.default_workers()
    self.mesh = mesh or sharding.make_mesh()
    if reuse_buffers is None:
      reuse_buffers = all(d.platform != "cpu" for d in self.mesh.devices.flat)
    self.reuse_buffers = reuse_buffers
    self.sharding = sharding.batch_sharded(self.mesh)
    n_proc = jax.process_count()
    if global_batch_size % self.mesh.size or global_batch_size % n_proc:
      step = math.lcm(self.mesh.size, n_proc)
      below, above = global_batch_size // step * step, (global_batch_size // step + 1) * step
      raise ValueError(
          f"global batch {global_batch_size} does not divide over {self.mesh.size} devices and "
          f"{n_proc} host(s); set --config.batch_size to a multiple of {step} (e.g. "
          f"{below or above} or {above}), or use fewer devices (CUDA_VISIBLE_DEVICES)")
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // n_proc
    self.max_objects = max_objects or crops.max_objects_in_window(self.cases, self.crop_size)
    self.cache = cache if cache is not None else roi_store.RoiCache(load_roi, cache_bytes)
    self.stain_params = stain_params
    if stain_params is not None and (missing := {c.case_id for c in self.cases} - set(stain_params)):
      raise ValueError(f"no stain params for case(s) {sorted(missing)[:5]}")
    self._validation_plan = None

  def plan(self, epoch: int) -> sampling.Plan:
    """This host's patches of `epoch` (the fixed set when validating)."""
    if self.validation:
      if self._validation_plan is None:
        self._validation_plan = sampling.validation_plan(
            self.cases, self.patches_per_epoch, self.patch_size, self.seed,
            self.guided_fraction)
      full = self._validation_plan
    else:
      full = sampling.epoch_plan(self.cases, self.patches_per_epoch, self.patch_size,
                                 self.seed, epoch, self.guided_fraction)
    return sampling.host_shard(full, jax.process_index(), jax.process_count())

  @functools.cached_property
  def steps_per_epoch(self) -> int:
    steps = sampling.steps_per_epoch(len(self.plan(0)), self.local_batch_size)
    if steps < 1:
      raise ValueError(
          f"{self.patches_per_epoch} patches per epoch over {len(self.cases)} cases "
          f"make no full batch of {self.global_batch_size}")
    return steps

  def host_batches(self, start_step: int = 0, epochs: int | None = None
                   ) -> Iterator[dict[str, np.ndarray]]:
    """This host's batches from global step `start_step` on (NumPy)."""
    per_epoch = self.steps_per_epoch
    epoch, offset = divmod(start_step, per_epoch)
    while epochs is None or epoch < epochs:
      yield from crops.batches(self.plan(0 if self.validation else epoch), self.cache,
                                 self.local_batch_size, self.crop_size, self.max_objects,
                                 start=offset, window=self.window,
                                 reuse_buffers=self.reuse_buffers, workers=self.workers,
                                 stain=self.stain_params)
      epoch, offset = epoch + 1, 0

  def to_global(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Host-local batch -> arrays sharded over the mesh's data axis."""
    out = {k: jax.make_array_from_process_local_data(self.sharding, v)
           for k, v in batch.items()}
    if self.reuse_buffers:  # The host arrays are refilled next: finish the copy.
      jax.block_until_ready(out)
    return out

  def batches(self, start_step: int = 0, epochs: int | None = None
              ) -> Iterator[dict[str, jax.Array]]:
    """Global batches from `start_step` on, prepared ahead in a thread."""
    return _prefetch(map(self.to_global, self.host_batches(start_step, epochs)), self.prefetch)


def _prefetch(it: Iterator, size: int) -> Iterator:
  """Runs `it` in a daemon thread, `size` items ahead; re-raises its errors."""
  if size <= 0:
    yield from it
    return
  q: queue.Queue = queue.Queue(maxsize=size)
  done = object()

  def work():
    try:
      for item in it:
        q.put(item)
      q.put(done)
    except BaseException as e:  # Handed to the consumer.
      q.put(e)

  threading.Thread(target=work, daemon=True).start()
  while (item := q.get()) is not done:
    if isinstance(item, BaseException):
      raise item
    yield item
