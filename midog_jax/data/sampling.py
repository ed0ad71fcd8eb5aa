"""The reference's guided patch sampling, as pure functions of a seed.

Each epoch every case gets floor(patches_per_epoch / #cases) patches. A case
without mitotic figures gets uniformly random locations; otherwise each patch
is, with probability `guided_fraction`, a uniformly random location, or else
a patch around a mitotic figure drawn uniformly from the case's figures:

  x0 = clip(bx - randint(0, P), 0, W - P),  bx = centre_x - 25

(the same for y), where (bx, by) is the figure box's top-left corner and
randint is Python's `random.randint`, whose upper bound is inclusive. The
offset lies in [0, P], not [0, P - 50], so the box's top-left corner
(clamped to the image) lies in the patch or on its right or bottom edge, but the
centre can fall up to 25 px beyond the patch's right or bottom edge; the host
crop's margin still holds it (see `crops`).

A plan is a pure function of (seed, epoch, case list): the generator is
`np.random.default_rng([seed, epoch])` and draws a fixed number of values per
patch, so a resumed run replays the same plans. This module imports neither
TensorFlow nor TFDS.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from midog_jax.data import annotations

MITOTIC = annotations.MITOTIC_FIGURE
HALF_BOX = annotations.BOX_SIZE / 2
# Spawn key that separates the validation stream from every training epoch.
_VALIDATION_STREAM = 0x76616C


@dataclasses.dataclass(frozen=True, eq=False)
class SampledCase:
  """What the sampler and the cropper need to know about one case."""
  case_id: int
  width: int
  height: int
  centers: np.ndarray  # float32 [M, 2], (x, y) in image pixels.
  labels: np.ndarray  # int32 [M], 1 mitotic, 2 non-mitotic.

  def __post_init__(self):
    centers = np.asarray(self.centers, np.float32).reshape(-1, 2)
    labels = np.asarray(self.labels, np.int32).reshape(-1)
    if len(centers) != len(labels):
      raise ValueError(f"case {self.case_id}: {len(centers)} centres but "
                       f"{len(labels)} labels")
    if self.width <= 0 or self.height <= 0:
      raise ValueError(f"case {self.case_id}: image size {self.width} x "
                       f"{self.height}")
    object.__setattr__(self, "centers", centers)
    object.__setattr__(self, "labels", labels)

  @property
  def mitotic_centers(self) -> np.ndarray:
    return self.centers[self.labels == MITOTIC]

  @classmethod
  def from_case(cls, case: annotations.Case) -> SampledCase:
    return cls(
        case_id=case.id, width=case.width, height=case.height,
        centers=np.array([(o.x, o.y) for o in case.objects],
                         np.float32).reshape(-1, 2),
        labels=np.array([o.label for o in case.objects], np.int32))


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
  """One epoch's patches, in the order they are to be used."""
  cases: tuple[SampledCase, ...]
  case_index: np.ndarray  # int32 [K], index into `cases`.
  x0: np.ndarray  # int32 [K], patch top-left in image pixels.
  y0: np.ndarray  # int32 [K].
  is_guided: np.ndarray  # bool [K], placed around a mitotic figure.
  figure: np.ndarray  # int32 [K], index into the case's mitotic figures; -1.
  patch_size: int

  def __len__(self) -> int:
    return len(self.case_index)

  def take(self, index: np.ndarray | slice) -> Plan:
    """The patches at `index`, same cases."""
    return dataclasses.replace(
        self, case_index=self.case_index[index], x0=self.x0[index],
        y0=self.y0[index], is_guided=self.is_guided[index],
        figure=self.figure[index])

  def case_ids(self) -> np.ndarray:
    ids = np.array([c.case_id for c in self.cases], np.int64)
    return ids[self.case_index]


def _check(cases: Sequence[SampledCase], patches: int, patch_size: int,
           guided_fraction: float) -> int:
  if not cases:
    raise ValueError("no cases to sample from")
  if patch_size <= 0:
    raise ValueError(f"patch_size must be positive, got {patch_size}")
  if not 0.0 <= guided_fraction <= 1.0:
    raise ValueError(f"guided_fraction {guided_fraction} is not in [0, 1]")
  per_case = patches // len(cases)
  if per_case < 1:
    raise ValueError(
        f"{patches} patches over {len(cases)} cases leaves none per case")
  return per_case


def _sample(cases: Sequence[SampledCase], patches: int, patch_size: int,
            rng: np.random.Generator, guided_fraction: float) -> Plan:
  """The reference's sampling with `rng`; see the module docstring."""
  cases = tuple(cases)
  per_case = _check(cases, patches, patch_size, guided_fraction)
  n = len(cases)
  k = n * per_case
  case_index = np.repeat(np.arange(n, dtype=np.int32), per_case)
  n_mitotic = np.array([len(c.mitotic_centers) for c in cases])[case_index]
  # Highest top-left that keeps the patch inside; 0 for images smaller
  # than a patch (the cropper pads them).
  max_x = np.array([max(c.width - patch_size, 0) for c in cases])[case_index]
  max_y = np.array([max(c.height - patch_size, 0) for c in cases])[case_index]

  # Every draw happens for every patch, used or not, so the stream does not
  # depend on which branch earlier patches took.
  rand_x = rng.integers(0, max_x + 1)
  rand_y = rng.integers(0, max_y + 1)
  coin = rng.random(k)
  pick = rng.random(k)
  offset = rng.integers(0, patch_size, size=(k, 2), endpoint=True)  # randint(0, P): inclusive.
  order = rng.permutation(k)

  is_guided = (n_mitotic > 0) & (coin >= 1.0 - guided_fraction)
  figure = np.where(is_guided, np.minimum(
      (pick * n_mitotic).astype(np.int64), np.maximum(n_mitotic - 1, 0)), -1)
  x0, y0 = rand_x.astype(np.int64), rand_y.astype(np.int64)
  for i in np.flatnonzero(is_guided):
    cx, cy = cases[case_index[i]].mitotic_centers[figure[i]]
    # int() truncates toward zero like the reference's int(xmin - ...).
    gx = int(cx - HALF_BOX - offset[i, 0])
    gy = int(cy - HALF_BOX - offset[i, 1])
    x0[i] = min(max(gx, 0), max_x[i])
    y0[i] = min(max(gy, 0), max_y[i])
  return Plan(
      cases=cases, case_index=case_index[order],
      x0=x0[order].astype(np.int32), y0=y0[order].astype(np.int32),
      is_guided=is_guided[order], figure=figure[order].astype(np.int32),
      patch_size=patch_size)


def epoch_plan(cases: Sequence[SampledCase], patches_per_epoch: int,
               patch_size: int, seed: int, epoch: int,
               guided_fraction: float = 0.5) -> Plan:
  """The training patches of `epoch`, shuffled; pure in its arguments.

  Args:
    cases: the run's training cases; their order is part of the key.
    patches_per_epoch: each case gets floor(patches_per_epoch / #cases).
    patch_size: patch side P in pixels.
    seed: run seed, >= 0.
    epoch: epoch number, >= 0.
    guided_fraction: chance that a patch of a case with mitotic figures is
      placed around one (the reference's 1/2).
  """
  if seed < 0 or epoch < 0:
    raise ValueError(f"seed {seed} and epoch {epoch} must be >= 0")
  rng = np.random.default_rng([seed, epoch])
  return _sample(cases, patches_per_epoch, patch_size, rng, guided_fraction)


def validation_plan(cases: Sequence[SampledCase], patches: int,
                    patch_size: int, seed: int,
                    guided_fraction: float = 0.5) -> Plan:
  """A fixed set of validation patches: the same on every call.

  Drawn like a training epoch but from a stream that no training epoch uses.
  """
  if seed < 0:
    raise ValueError(f"seed {seed} must be >= 0")
  rng = np.random.default_rng(np.random.SeedSequence(
      seed, spawn_key=(_VALIDATION_STREAM,)))
  return _sample(cases, patches, patch_size, rng, guided_fraction)


def host_shard(plan: Plan, process_index: int, process_count: int) -> Plan:
  """This host's share of an epoch: the patches of its own cases.

  Host h owns cases h, h + n, h + 2n, ... of the plan's case list, so each
  host decodes and caches only about 1/n of the ROIs. Hosts step in
  lockstep, so every host keeps the first m of its patches (plan order),
  m being the smallest share; shares differ by at most one case's patches.
  Global batch k is the hosts' k-th local batches, in process order.
  """
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
        f"process {process_index} of {process_count} is not a valid host")
  if len(plan.cases) < process_count:
    raise ValueError(f"{len(plan.cases)} cases cannot be shared by "
                     f"{process_count} hosts")
  owner = plan.case_index % process_count
  share = min(int((owner == h).sum()) for h in range(process_count))
  return plan.take(np.flatnonzero(owner == process_index)[:share])


def steps_per_epoch(plan_length: int, batch_size: int) -> int:
  """Full batches in an epoch of `plan_length` patches (the tail is dropped)."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  return plan_length // batch_size
