"""Jitted train step and forward pass over split NNX state.

The model is split once into a static graph definition and two pytrees
(parameters, BatchNorm statistics). The step functions are pure JAX over
those pytrees, jitted once, so no per-step Python work grows with the model.
With a mesh, parameters are replicated and the batch is sharded over the
mesh's 'data' axis; XLA then computes BatchNorm statistics and the loss over
the global batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from midog_jax import losses as loss_lib

DATA_AXIS = "data"


class TrainState(NamedTuple):
  params: nnx.State
  batch_stats: nnx.State
  opt_state: optax.OptState


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State,
                                              nnx.State]:
  """(graphdef, params, batch_stats) of a model."""
  return nnx.split(model, nnx.Param, nnx.BatchStat)


def init_train_state(model: nnx.Module, tx: optax.GradientTransformation
                     ) -> tuple[nnx.GraphDef, TrainState]:
  """The static graph definition and the initial train state.

  The state holds copies, so donating it to the train step leaves `model`
  usable.
  """
  graphdef, params, batch_stats = split_model(model)
  params, batch_stats = jax.tree.map(jnp.copy, (params, batch_stats))
  return graphdef, TrainState(params, batch_stats, tx.init(params))


def abstract_train_state(make_model: Callable[[], nnx.Module], tx: optax.GradientTransformation,
                         sharding: jax.sharding.Sharding) -> tuple[nnx.GraphDef, TrainState]:
  """The graph definition and the train state's shapes, for restoring a checkpoint.

  No weight is computed: initialising what a checkpoint replaces costs
  seconds at start-up.
  """
  graphdef, state = nnx.eval_shape(lambda: init_train_state(make_model(), tx))
  return graphdef, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def merge_model(graphdef: nnx.GraphDef, state: TrainState) -> nnx.Module:
  """A model object back from a train state, e.g. for checkpoints."""
  return nnx.merge(graphdef, state.params, state.batch_stats)


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A one-axis data-parallel mesh over `devices` (default: all)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.array(devices), (DATA_AXIS,))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places every leaf of `tree` on all devices of the mesh."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(tree: Any, mesh: Mesh) -> Any:
  """Splits the leading (batch) axis of every leaf over the mesh."""
  return jax.device_put(tree, NamedSharding(mesh, P(DATA_AXIS)))


def _jit(fn: Callable, mesh: Mesh | None, n_replicated: int, n_sharded: int,
         out_shardings: Any, donate: tuple[int, ...]) -> Callable:
  if mesh is None:
    return jax.jit(fn, donate_argnums=donate)
  rep, dat = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS))
  return jax.jit(fn, in_shardings=(rep,) * n_replicated + (dat,) * n_sharded,
                 out_shardings=out_shardings(rep, dat), donate_argnums=donate)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    loss_config: loss_lib.LossConfig = loss_lib.LossConfig(),
                    mesh: Mesh | None = None, donate: bool = True
                    ) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """A jitted `step(state, images, gt_boxes, gt_valid) -> (state, metrics)`.

  images [B, H, W, 3] float, already normalised; gt_boxes [B, N, 4] as
  (x1, y1, x2, y2) pixels; gt_valid [B, N] bool. Metrics are the batch's
  loss, focal, box and num_positives. The input state is donated.
  """

  def step(state: TrainState, images: jax.Array, gt_boxes: jax.Array,
           gt_valid: jax.Array):
    image_hw = images.shape[1:3]

    def loss_fn(params, batch_stats):
      # copy=True: fresh variables in this trace, so BatchNorm may update them.
      model = nnx.merge(graphdef, params, batch_stats, copy=True)
      cls_logits, box_deltas = model(images, train=True)
      loss, metrics = loss_lib.retinanet_loss(
          cls_logits, box_deltas, model.anchors(image_hw), gt_boxes,
          gt_valid, image_hw, loss_config)
      return loss, (nnx.state(model, nnx.BatchStat), metrics)

    grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(params, batch_stats, opt_state), metrics

  return _jit(step, mesh, 1, 3, lambda rep, dat: (rep, rep),
              (0,) if donate else ())


def make_forward(graphdef: nnx.GraphDef, mesh: Mesh | None = None
                 ) -> Callable[[nnx.State, nnx.State, jax.Array],
                               tuple[jax.Array, jax.Array]]:
  """A jitted eval-mode `forward(params, batch_stats, images)`.

  Returns class logits [B, A, C] and box deltas [B, A, 4] (float32), with
  anchors as `model.anchors(image_hw)`.
  """

  def forward(params: nnx.State, batch_stats: nnx.State, images: jax.Array):
    model = nnx.merge(graphdef, params, batch_stats)
    return model(images, train=False)

  return _jit(forward, mesh, 2, 1, lambda rep, dat: (dat, dat), ())


def scores(cls_logits: jax.Array) -> jax.Array:
  """Detection score per anchor: max over class columns of the sigmoid."""
  return jnp.max(jax.nn.sigmoid(cls_logits), axis=-1)
