"""The train state and the jitted steps over it: train, validation loss, patch detection.

The model is split once into a static graph definition and two pytrees
(parameters, BatchNorm statistics). The step functions are pure JAX over
those pytrees, jitted once, so no per-step Python work grows with the model.
With a mesh, parameters are replicated and the batch is sharded over the
mesh's 'data' axis; XLA then computes BatchNorm statistics and the loss over
the global batch.

`make_train_step` takes normalised images and boxes; the `make_batch_*`
functions take the input pipeline's batches (uint8 crops, object centres)
and augment on the device inside the same program. `make_group_train_step`
trains K runs of one network in one program, their states stacked on a
leading run axis (a run group, `group.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
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


def loss_and_grads(graphdef: nnx.GraphDef, loss_config: losses.LossConfig
                   ) -> Callable[..., tuple[nnx.State, nnx.State, dict[str, jax.Array]]]:
  """`grads(params, batch_stats, images, gt_boxes, gt_valid) -> (grads, batch_stats, metrics)`.

  Pure (not jitted): the forward and backward pass of one run, which a group
  of runs maps over its run axis.
  """

  def grads(params, batch_stats, images, gt_boxes, gt_valid):
    image_hw = images.shape[1:3]

    def loss_fn(params, batch_stats):
      # copy=True: fresh variables in this trace, so BatchNorm may update them.
      model = nnx.merge(graphdef, params, batch_stats, copy=True)
      cls_logits, box_deltas = model(images, train=True)
      loss, metrics = losses.retinanet_loss(
          cls_logits, box_deltas, model.anchors(image_hw), gt_boxes,
          gt_valid, image_hw, loss_config)
      return loss, (nnx.state(model, nnx.BatchStat), metrics)

    g, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(params, batch_stats)
    return g, batch_stats, metrics

  return grads


def apply_updates(tx: optax.GradientTransformation) -> Callable:
  """`update(grads, params, opt_state) -> (params, opt_state)`: one optimiser step, pure."""

  def update(grads, params, opt_state):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return update


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    loss_config: losses.LossConfig = losses.LossConfig(),
                    mesh: Mesh | None = None, donate: bool = True
                    ) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """A jitted `step(state, images, gt_boxes, gt_valid) -> (state, metrics)`.

  images [B, H, W, 3] float, already normalised; gt_boxes [B, N, 4] as
  (x1, y1, x2, y2) pixels; gt_valid [B, N] bool. Metrics are the batch's
  loss, focal, box and num_positives. The input state is donated.
  """
  grads_fn, update = loss_and_grads(graphdef, loss_config), apply_updates(tx)

  def step(state: TrainState, images: jax.Array, gt_boxes: jax.Array,
           gt_valid: jax.Array):
    grads, batch_stats, metrics = grads_fn(state.params, state.batch_stats, images, gt_boxes,
                                           gt_valid)
    params, opt_state = update(grads, state.params, state.opt_state)
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
  # Stain switches: each patch's normalisation params come with the batch (absent
  # where the ROIs were normalised on the host); RandStainNA's statistics with the run.
  run_stain = getattr(norm, "stain", None)
  stats = None if run_stain is None or run_stain.distribution is None else jnp.asarray(
      run_stain.distribution, jnp.float32)
  return augment.augment_batch(
      key, batch["crops"], batch["centers"], mitotic, patch_size=patch_size,
      mean=jnp.asarray(norm.unit_mean), std=jnp.asarray(norm.unit_std), config=aug,
      dtype=dtype, stain=batch.get("stain"), randstainna_stats=stats)


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


def make_group_train_step(graphdef, tx_groups: Sequence[tuple[optax.GradientTransformation,
                                                               Sequence[int]]],
                          config, norms: Sequence, mesh, mapped: bool = True) -> Callable:
  """`step(state, batches, keys, steps, active) -> (state, metrics)`: K runs in one program.

  `state` holds the K runs' TrainStates stacked on a leading run axis
  (replicated over the mesh); `batches` is a tuple of K input-pipeline
  batches (each sharded over "data"); `keys` the runs' base keys [K], folded
  with `steps` (int32 [K], each run's own step) as a single run folds them;
  `active` (bool [K]): a run that is not (it has finished) keeps its state.
  Each run is augmented with its own normalisation (`norms`, one program
  per run, unrolled, so its images are a single run's), forward and backward
  passes are mapped over the run axis (`jax.vmap`: each run's BatchNorm
  statistics over its own batch), and `tx_groups` ((optimiser, runs), ...)
  updates the runs of each optimiser (each schedule) together. Metrics are
  [K] arrays. The state is donated. `mapped=False` puts each run's own
  passes and update one after another in the program instead (a single
  run's shapes: nothing batched over runs), for comparison
  (benchmarks/group_step.py --unmapped).
  """
  plain = loss_and_grads(graphdef, losses.LossConfig.from_config(config))
  grads_fn = jax.vmap(plain)
  tx_of = {k: tx for tx, runs in tx_groups for k in runs}
  aug, dtype = augment.AugmentConfig.from_config(config), jnp.dtype(config.model.dtype)
  margin_targets = config.augment.get("margin_targets", False)

  def step(state, batches, keys, run_steps, active):
    per_run = [_targets(b, config.patch_size, norm, aug, dtype,
                        jax.random.fold_in(keys[k], run_steps[k]), margin_targets)
               for k, (b, norm) in enumerate(zip(batches, norms))]
    if mapped:
      images, boxes, valid = (jnp.stack(x) for x in zip(*per_run))
      grads, batch_stats, metrics = grads_fn(state.params, state.batch_stats, images, boxes,
                                             valid)
      params, opt_state = _group_updates(tx_groups, grads, state.params, state.opt_state)
    else:
      runs = []
      for k, targets in enumerate(per_run):
        p, b, o = jax.tree.map(lambda x: x[k], (state.params, state.batch_stats, state.opt_state))
        g, b, m = plain(p, b, *targets)
        runs.append((*apply_updates(tx_of[k])(g, p, o), b, m))
      params, opt_state, batch_stats, metrics = (jax.tree.map(lambda *x: jnp.stack(x), *part)
                                                 for part in zip(*runs))

    def keep(new, old):  # Finished runs: the state they had.
      return jax.tree.map(lambda n, o: jnp.where(
          active.reshape(active.shape + (1,) * (n.ndim - 1)), n, o), new, old)

    return TrainState(keep(params, state.params), keep(batch_stats, state.batch_stats),
                      keep(opt_state, state.opt_state)), metrics

  rep, dat = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  return jax.jit(step, in_shardings=(rep, dat, rep, rep, rep), out_shardings=(rep, rep),
                 donate_argnums=(0,))


def _group_updates(tx_groups, grads, params, opt_state):
  """Each optimiser's step on its runs' rows of the stacked trees.

  A run alone with its optimiser is updated unmapped (its rows taken out):
  the program of a single run, bit for bit.
  """
  if len(tx_groups) == 1 and len(tx_groups[0][1]) > 1:
    return jax.vmap(apply_updates(tx_groups[0][0]))(grads, params, opt_state)
  new_params, new_opt = params, opt_state
  for tx, runs in tx_groups:
    index = np.asarray(runs)
    rows = [jax.tree.map(lambda x: x[index], t) for t in (grads, params, opt_state)]
    if len(runs) == 1:
      one = apply_updates(tx)(*(jax.tree.map(lambda x: x[0], t) for t in rows))
      p, o = jax.tree.map(lambda x: x[None], one)
    else:
      p, o = jax.vmap(apply_updates(tx))(*rows)
    new_params = jax.tree.map(lambda full, part: full.at[index].set(part), new_params, p)
    new_opt = jax.tree.map(lambda full, part: full.at[index].set(part), new_opt, o)
  return new_params, new_opt


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
