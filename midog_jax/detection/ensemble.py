"""Several trained models as one detector: one pass over the pixels, fused detections.

The members' weights and normalisations are stacked, and one jitted call
runs every member on each batch of windows (`jax.vmap` over the member
axis of the window detector on accelerators; on the CPU, where XLA's
convolutions batched over kernels are slow, `lax.map`: the members one
after another inside the same call). Each member's detections go through its own
whole-image suppression by distance, as a single model's do; then `fuse`
clusters them across members within the same radius and scores a cluster
with the mean of its members' scores, a member without a detection there
counting 0 (as weighted box fusion does), placed at the score-weighted mean.

The operating point of an ensemble is the mean of its members' operating
points (each chosen on that member's validation fold): the fused score is a
mean of member scores, so a figure that each member scores at its own
threshold is scored at their mean. Out-of-fold validation of a fold
ensemble is not possible (every case is in some member's training set).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy.spatial import cKDTree

from midog_jax import sharding
from midog_jax.detection import sliding_window
from midog_jax.model import retinanet


def fuse(member_xy: Sequence[np.ndarray], member_scores: Sequence[np.ndarray],
         radius: float = sliding_window.DISTANCE_RADIUS) -> tuple[np.ndarray, np.ndarray]:
  """Fused (xy [D, 2], scores [D]) of M members' detections, by descending score.

  Greedy: the best detection not yet taken seeds a cluster, which takes from
  every member its best untaken detection within `radius` (inclusive) of the
  seed. Score: the sum of the cluster's scores over M; position: their
  score-weighted mean.
  """
  m = len(member_xy)
  xy = np.concatenate([np.asarray(x, np.float64).reshape(-1, 2) for x in member_xy])
  scores = np.concatenate([np.asarray(s, np.float64).reshape(-1) for s in member_scores])
  member = np.concatenate([np.full(len(s), k) for k, s in enumerate(member_scores)])
  order = np.argsort(-scores, kind="stable")
  taken = np.zeros(len(xy), bool)
  tree = cKDTree(xy) if len(xy) else None
  out_xy, out_scores = [], []
  for seed in order:
    if taken[seed]:
      continue
    near = np.asarray(tree.query_ball_point(xy[seed], radius), np.int64)
    near = near[~taken[near]]
    near = near[np.argsort(-scores[near], kind="stable")]
    chosen, seen = [], set()
    for i in [seed, *near[near != seed]]:
      if member[i] not in seen:
        seen.add(member[i])
        chosen.append(i)
    taken[chosen] = True
    w = scores[chosen]
    out_xy.append((xy[chosen] * w[:, None]).sum(0) / w.sum() if w.sum() > 0 else xy[seed])
    out_scores.append(w.sum() / m)
  if not out_scores:
    return np.zeros((0, 2)), np.zeros(0)
  fused_xy, fused = np.asarray(out_xy), np.asarray(out_scores)
  keep = np.argsort(-fused, kind="stable")
  return fused_xy[keep], fused[keep]


def fuse_members(xy: np.ndarray, scores: np.ndarray, member: np.ndarray, n_members: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Fused (xy, scores) of the members' raw window detections over one image or slide
  (`member` [D]: whose each is): each member's own suppression by distance first, as
  one model's detections get it, then `fuse`."""
  found = []
  for k in range(n_members):
    mine = member == k
    keep = sliding_window.suppress_by_distance(xy[mine], scores[mine])
    found.append((xy[mine][keep], scores[mine][keep]))
  return fuse([f[0] for f in found], [f[1] for f in found])


def check_compatible(configs: Sequence[Any], names: Sequence[str]) -> None:
  """Members must share the network and the window size to be stacked."""
  first = retinanet.RetinaNetConfig.from_config(configs[0], pretrained=False)
  for config, name in zip(configs[1:], names[1:]):
    if retinanet.RetinaNetConfig.from_config(config, pretrained=False) != first:
      raise ValueError(f"{name}: another network than {names[0]}; an ensemble's members "
                       "need one network configuration")
    if config.patch_size != configs[0].patch_size:
      raise ValueError(f"{name}: patch size {config.patch_size}, {names[0]}: "
                       f"{configs[0].patch_size}; an ensemble's members need one window size")


@dataclasses.dataclass
class EnsembleDetector:
  """Whole-image detection with M members in one jitted call per batch of windows."""
  runs: Sequence[Any]  # detector.LoadedRun
  threshold: float | None = None
  batch_size: int | None = None
  progress: bool = False
  members_by: str = "auto"  # "vmap", "map" (one after another in the call), "auto": by platform.

  def __post_init__(self):
    first = self.runs[0]
    check_compatible([r.config for r in self.runs], [r.workdir for r in self.runs])
    stains = [getattr(r.normalization, "stain", None) for r in self.runs]
    if any(s != stains[0] for s in stains):
      raise ValueError(f"{self.runs[0].workdir} and the other members normalise stains "
                       "differently; an ensemble's members need one stain normalisation")
    self.stain = stains[0]
    mesh = sharding.make_mesh(jax.local_devices())
    per_device = max(1, (self.batch_size or first.config.eval.batch_size) // mesh.size)
    self.batch_size = per_device * mesh.size
    self.patch = first.config.patch_size
    if self.threshold is None:
      self.threshold = first.config.eval.score_threshold
    self.min_overlap = first.config.eval.get("window_min_overlap", sliding_window.MIN_OVERLAP)
    inner = sliding_window.window_detections(
        sliding_window.network_forward(first.graphdef), self.patch,
        first.config.eval.max_detections_per_window)
    by = self.members_by
    if by == "auto":
      by = "map" if mesh.devices.flat[0].platform == "cpu" else "vmap"
    if by == "map":
      # XLA's CPU convolutions batched over kernels run far slower than the members one
      # after another (benchmarks/README.md): a loop over members inside the same call.
      def members(p, b, m, s, t, x):
        return jax.lax.map(lambda a: inner(a[0], a[1], a[2], a[3], t, x), (p, b, m, s))
    else:
      members = jax.vmap(inner, in_axes=(0, 0, 0, 0, None, None))
    rep, dat = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *[(r.params, r.batch_stats) for r in self.runs])
    mean = jnp.asarray(np.stack([r.normalization.unit_mean for r in self.runs]), jnp.float32)
    std = jnp.asarray(np.stack([r.normalization.unit_std for r in self.runs]), jnp.float32)
    self._weights = sharding.replicate((stacked, mean, std), mesh)
    member_sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
        None, sharding.DATA_AXIS))
    self._fn = jax.jit(lambda w, t, x: members(w[0][0], w[0][1], w[1], w[2], t, x),
                       in_shardings=(rep, rep, dat), out_shardings=member_sharded)

  def member_windows(self, windows: np.ndarray) -> tuple[np.ndarray, ...]:
    """(centres [M, B, K, 2], scores [M, B, K], valid [M, B, K]) of a batch of windows."""
    return self._fn(self._weights, jnp.float32(self.threshold), windows)

  def member_detections(self, image: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each member's whole-image detections, as a single model's detector gives them."""
    h, w = image.shape[:2]
    origins = sliding_window.window_origins(w, h, self.patch, 0.1, self.min_overlap)
    outputs = []
    for start in range(0, len(origins), self.batch_size):
      chunk = origins[start:start + self.batch_size]
      windows = sliding_window.crop_windows(image, chunk, self.patch, self.batch_size,
                                            sliding_window.PAD_VALUE)
      outputs.append(self.member_windows(windows))  # Asynchronous: cropping overlaps.
    centres, scores, valid = (np.concatenate([np.asarray(o[j]) for o in outputs], axis=1)
                              [:, :len(origins)] for j in range(3))
    found = []
    for k in range(len(self.runs)):
      xy, s = sliding_window.to_image_coordinates(origins, centres[k], scores[k], valid[k], (h, w))
      keep = sliding_window.suppress_by_distance(xy, s)
      found.append((xy[keep], s[keep]))
    return found

  def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if self.stain is not None:  # As each member's training images were.
      image = self.stain.normalize(image)
    found = self.member_detections(image)
    return fuse([xy for xy, _ in found], [s for _, s in found])
