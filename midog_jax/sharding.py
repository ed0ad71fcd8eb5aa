"""The device mesh and how arrays are placed on it.

One axis, "data": parameters are replicated, batches are split over their
leading axis, so XLA computes BatchNorm statistics and losses over the
global batch. Every stage that places arrays (training, detection,
selection) uses these helpers, so a second mesh axis (e.g. for runs trained
together) is added here once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A one-axis data-parallel mesh over `devices` (default: all)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.array(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """The leading (batch) axis is split over the mesh's data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places every leaf of `tree` on all devices of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def shard_batch(tree: Any, mesh: Mesh) -> Any:
  """Splits the leading (batch) axis of every leaf over the mesh."""
  return jax.device_put(tree, batch_sharded(mesh))


def jit_data_parallel(fn: Callable, mesh: Mesh | None, n_replicated: int, n_sharded: int,
                      out_shardings: Callable[[NamedSharding, NamedSharding], Any],
                      donate: tuple[int, ...] = ()) -> Callable:
  """`jax.jit` of `fn(*replicated_args, *batch_args)` over `mesh` (plain jit without).

  `out_shardings(replicated, batch_sharded)` gives the outputs' shardings.
  """
  if mesh is None:
    return jax.jit(fn, donate_argnums=donate)
  rep, dat = replicated(mesh), batch_sharded(mesh)
  return jax.jit(fn, in_shardings=(rep,) * n_replicated + (dat,) * n_sharded,
                 out_shardings=out_shardings(rep, dat), donate_argnums=donate)
