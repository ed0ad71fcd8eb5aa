"""The train state and the jitted steps over it: train, validation loss, patch detection.

The model is split once into a static graph definition and two pytrees
(parameters, BatchNorm statistics). The step functions are pure JAX over
those pytrees, jitted once, so no per-step Python work grows with the model.
With a mesh, parameters are replicated and the batch is sharded over the
mesh's 'data' axis; XLA then computes BatchNorm statistics and the loss over
the global batch.

`make_train_step` takes normalised images and boxes; the `make_batch_*`
functions take the input pipeline's batches (uint8 crops, object centres)
and augment on the device inside the same program.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from midog_jax import sharding
from midog_jax.data import annotations
from midog_jax.data import augment
from midog_jax.model import boxes as box_lib
from midog_jax.model import losses
from midog_jax.model import retinanet

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
                         placement: jax.sharding.Sharding) -> tuple[nnx.GraphDef, TrainState]:
  """The graph definition and the train state's shapes, for restoring a checkpoint.

  No weight is computed: initialising what a checkpoint replaces costs
  seconds at start-up. Every leaf is to be placed as `placement`.
  """
  graphdef, state = nnx.eval_shape(lambda: init_train_state(make_model(), tx))
  return graphdef, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placement), state)


def merge_model(graphdef: nnx.GraphDef, state: TrainState) -> nnx.Module:
  """A model object back from a train state, e.g. for checkpoints."""
  return nnx.merge(graphdef, state.params, state.batch_stats)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    loss_config: losses.LossConfig = losses.LossConfig(),
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
      loss, metrics = losses.retinanet_loss(
          cls_logits, box_deltas, model.anchors(image_hw), gt_boxes,
          gt_valid, image_hw, loss_config)
      return loss, (nnx.state(model, nnx.BatchStat), metrics)

    grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(params, batch_stats, opt_state), metrics

  return sharding.jit_data_parallel(step, mesh, 1, 3, lambda rep, dat: (rep, rep),
                                    (0,) if donate else ())


def _targets(batch, patch_size, norm, aug, dtype, key, margin_targets=False):
  """Device-side augmentation; only mitotic figures are training targets.

  As the reference, only figures whose centre lies strictly inside the patch
  are targets; `margin_targets` also keeps those of the crop's margin, which
  rotation and warping can bring into view (the reference pads with a
  reflection there instead of real tissue).
  """
  mitotic = batch["valid"] & (batch["labels"] == annotations.MITOTIC_FIGURE)
  if not margin_targets:
    margin = augment.margin(patch_size)
    c = batch["centers"]
    mitotic &= ((c > margin) & (c < margin + patch_size)).all(-1)
  return augment.augment_batch(
      key, batch["crops"], batch["centers"], mitotic, patch_size=patch_size,
      mean=jnp.asarray(norm.unit_mean), std=jnp.asarray(norm.unit_std), config=aug,
      dtype=dtype)


def make_batch_train_step(graphdef, tx, config, norm, mesh) -> Callable:
  """`step(state, batch, key) -> (state, metrics)`, jitted over the mesh."""
  inner = make_train_step(graphdef, tx, losses.LossConfig.from_config(config), mesh=None,
                          donate=False)
  aug, dtype = augment.AugmentConfig.from_config(config), jnp.dtype(config.model.dtype)

  margin_targets = config.augment.get("margin_targets", False)

  def batch_step(state, batch, key):
    images, boxes, valid = _targets(batch, config.patch_size, norm, aug, dtype, key,
                                    margin_targets)
    return inner(state, images, boxes, valid)

  rep, dat = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  return jax.jit(batch_step, in_shardings=(rep, dat, rep), out_shardings=(rep, rep),
                 donate_argnums=(0,))


def make_batch_eval_loss(graphdef, config, norm, mesh) -> Callable:
  """`eval_loss(state, batch) -> metrics`: eval-mode BatchNorm, no augmentation."""
  aug = augment.AugmentConfig.from_config(config, enabled=False)
  dtype = jnp.dtype(config.model.dtype)
  loss_cfg = losses.LossConfig.from_config(config)

  def eval_loss(state, batch):
    images, boxes, valid = _targets(batch, config.patch_size, norm, aug, dtype,
                                    jax.random.key(0))
    model = nnx.merge(graphdef, state.params, state.batch_stats)
    cls_logits, box_deltas = model(images, train=False)
    hw = images.shape[1:3]
    _, metrics = losses.retinanet_loss(cls_logits, box_deltas, model.anchors(hw), boxes,
                                       valid, hw, loss_cfg)
    return metrics

  rep, dat = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  return jax.jit(eval_loss, in_shardings=(rep, dat), out_shardings=rep)


def make_patch_detector(graphdef, config, norm, mesh) -> Callable:
  """`detect(state, batch) -> (boxes [B, A, 4], scores [B, A])` on the centre
  patches of a batch (no augmentation, eval-mode BatchNorm): every anchor's
  decoded box (x1, y1, x2, y2) in patch pixels, clamped to the patch, and its
  score (max over the sigmoid class columns), for `selection`."""
  aug = augment.AugmentConfig.from_config(config, enabled=False)
  dtype = jnp.dtype(config.model.dtype)

  def detect(state, batch):
    images, _, _ = _targets(batch, config.patch_size, norm, aug, dtype, jax.random.key(0))
    model = nnx.merge(graphdef, state.params, state.batch_stats)
    logits, deltas = model(images, train=False)
    hw = images.shape[1:3]
    anchors = jnp.asarray(model.anchors(hw))
    boxes = box_lib.cthw_to_xyxy(box_lib.decode(deltas.astype(jnp.float32), anchors), hw)
    return boxes, retinanet.scores(logits.astype(jnp.float32))

  rep, dat = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  return jax.jit(detect, in_shardings=(rep, dat), out_shardings=(dat, dat))
