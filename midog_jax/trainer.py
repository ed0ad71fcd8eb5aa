"""The training loop: one (experiment, fold) run in a work directory.

Data parallel with `jax.jit` over a one-axis mesh: parameters replicated,
batches sharded on "data", so BatchNorm statistics and the loss are over the
global batch. Augmentation runs on the device inside the jitted step. The
batch and the augmentation key at step k depend only on (seed, k, cases), so
a run interrupted (SIGTERM, Ctrl-C) and resumed ends as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from midog_jax import annotations
from midog_jax import augment
from midog_jax import boxes as box_lib
from midog_jax import checkpoints
from midog_jax import cli
from midog_jax import files
from midog_jax import losses
from midog_jax import metric_writer
from midog_jax import model as model_lib
from midog_jax import normalization as normalization_lib
from midog_jax import optim
from midog_jax import steps
from midog_jax import workdir as workdir_lib


class TrainingDiverged(RuntimeError):
  """The loss became NaN or infinite."""


def augment_config(config: ml_collections.ConfigDict, enabled: bool = True) -> augment.AugmentConfig:
  a = config.augment
  return augment.AugmentConfig(
      enabled=enabled and a.enabled, max_warp=a.max_warp, max_rotate=a.max_rotate,
      max_zoom=a.max_zoom, p_affine=a.p_affine, brightness=tuple(a.brightness),
      contrast=tuple(a.contrast), p_lighting=a.p_lighting)


def model_config(config: ml_collections.ConfigDict,
                 pretrained: bool = True) -> model_lib.RetinaNetConfig:
  """The network of `config`; `pretrained=False` leaves out the body weights
  (a resumed run restores every weight from its checkpoint)."""
  m = config.model
  return model_lib.RetinaNetConfig(levels=tuple(m.levels), num_classes=m.num_classes,
                                   dtype=m.dtype, body_weights=m.body_weights if pretrained else None)


def loss_config(config: ml_collections.ConfigDict) -> losses.LossConfig:
  return losses.LossConfig(gamma=config.loss.gamma, focal=config.loss.focal)


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


def make_train_step(graphdef, tx, config, norm, mesh) -> Callable:
  """`step(state, batch, key) -> (state, metrics)`, jitted over the mesh."""
  inner = steps.make_train_step(graphdef, tx, loss_config(config), mesh=None, donate=False)
  aug, dtype = augment_config(config), jnp.dtype(config.model.dtype)

  margin_targets = config.augment.get("margin_targets", False)

  def step(state, batch, key):
    images, boxes, valid = _targets(batch, config.patch_size, norm, aug, dtype, key,
                                    margin_targets)
    return inner(state, images, boxes, valid)

  rep, dat = NamedSharding(mesh, P()), NamedSharding(mesh, P(steps.DATA_AXIS))
  return jax.jit(step, in_shardings=(rep, dat, rep), out_shardings=(rep, rep),
                 donate_argnums=(0,))


def make_eval_loss(graphdef, config, norm, mesh) -> Callable:
  """`eval_loss(state, batch) -> metrics`: eval-mode BatchNorm, no augmentation."""
  aug, dtype = augment_config(config, enabled=False), jnp.dtype(config.model.dtype)
  loss_cfg = loss_config(config)

  def eval_loss(state, batch):
    images, boxes, valid = _targets(batch, config.patch_size, norm, aug, dtype,
                                    jax.random.key(0))
    model = nnx.merge(graphdef, state.params, state.batch_stats)
    cls_logits, box_deltas = model(images, train=False)
    hw = images.shape[1:3]
    _, metrics = losses.retinanet_loss(cls_logits, box_deltas, model.anchors(hw), boxes,
                                       valid, hw, loss_cfg)
    return metrics

  rep, dat = NamedSharding(mesh, P()), NamedSharding(mesh, P(steps.DATA_AXIS))
  return jax.jit(eval_loss, in_shardings=(rep, dat), out_shardings=rep)


def make_patch_detector(graphdef, config, norm, mesh) -> Callable:
  """`detect(state, batch) -> (boxes [B, A, 4], scores [B, A])` on the centre
  patches of a batch (no augmentation, eval-mode BatchNorm): every anchor's
  decoded box (x1, y1, x2, y2) in patch pixels, clamped to the patch, and its
  score (max over the sigmoid class columns), for `selection`."""
  aug, dtype = augment_config(config, enabled=False), jnp.dtype(config.model.dtype)

  def detect(state, batch):
    images, _, _ = _targets(batch, config.patch_size, norm, aug, dtype, jax.random.key(0))
    model = nnx.merge(graphdef, state.params, state.batch_stats)
    logits, deltas = model(images, train=False)
    hw = images.shape[1:3]
    anchors = jnp.asarray(model.anchors(hw))
    boxes = box_lib.cthw_to_xyxy(box_lib.decode(deltas.astype(jnp.float32), anchors), hw)
    return boxes, steps.scores(logits.astype(jnp.float32))

  rep, dat = NamedSharding(mesh, P()), NamedSharding(mesh, P(steps.DATA_AXIS))
  return jax.jit(detect, in_shardings=(rep, dat), out_shardings=(dat, dat))


class _StopFlag:
  """Set by SIGTERM / SIGINT; the loop saves and exits at the next step."""

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    for s in (signal.SIGTERM, signal.SIGINT):
      self._previous[s] = signal.signal(s, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signum = signum

  def __exit__(self, *exc):
    for s, h in self._previous.items():
      signal.signal(s, h)

  def is_set(self) -> bool:
    if jax.process_count() == 1:
      return self.signum is not None
    from jax.experimental import multihost_utils  # Every host stops together.
    flags = multihost_utils.process_allgather(np.int32(self.signum is not None))
    return bool(np.any(flags))


def _mean(values: list[dict[str, jax.Array]]) -> dict[str, float]:
  if not values:
    return {}
  stacked = jax.device_get(values)
  return {k: float(np.mean([v[k] for v in stacked])) for k in stacked[0]}


@dataclasses.dataclass
class RunData:
  """What a run trains and validates on (see `experiment_data`)."""
  train: Any  # input_pipeline.PatchInput, training plans.
  valid: Any  # input_pipeline.PatchInput, the fixed validation patches.
  normalization: normalization_lib.Normalization
  # (graphdef, state, epoch) -> the selection metric (see `eval.selection`).
  validation_ap: Callable[[Any, Any, int], float] | None
  meta: dict[str, Any]  # Case lists etc., written with the run.


@dataclasses.dataclass
class TrainResult:
  summary: dict[str, Any]  # As written to summary.json.
  state: Any  # Final steps.TrainState (None when the run was already done).


def _run_files(config, data: RunData) -> dict[str, Any]:
  """What identifies the run; recorded at its first start, compared later."""
  return {"config.json": json.loads(config.to_json_best_effort()), "cases.json": data.meta,
          "normalization.json": data.normalization.to_json()}


def train(config: ml_collections.ConfigDict, workdir: str, data: RunData,
          mesh=None) -> TrainResult:
  """Trains (or resumes) the run in `workdir`, holding its lock meanwhile."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  lead = jax.process_index() == 0
  lock = workdir_lib.Lock(workdir).acquire() if lead else None
  try:
    return _train(config, workdir, data, mesh or steps.make_mesh(), lead)
  finally:
    if lock is not None:
      lock.release()


def _floats(values: list[dict[str, jax.Array]]) -> list[dict[str, float]]:
  return [{k: float(v) for k, v in m.items()} for m in jax.device_get(values)]


def _train(config, workdir: str, data: RunData, mesh, lead: bool) -> TrainResult:
  norm = data.normalization
  run_files = _run_files(config, data)
  changed = workdir_lib.check(workdir, run_files, config.get("resume_anyway", False))
  if changed:
    logging.warning("Continuing %s with changed settings: %s", workdir, "; ".join(changed))

  steps_per_epoch = data.train.steps_per_epoch
  data.valid.steps_per_epoch  # A validation set too small for one batch fails here, not later.
  total_steps = steps_per_epoch * config.num_epochs
  ckpt = checkpoints.RunCheckpoints(workdir)
  fresh = ckpt.latest_step() is None
  tx = optim.make_optimizer(
      total_steps, max_lr=config.optim.max_lr, weight_decay=config.optim.weight_decay,
      b2=config.optim.b2, pct_start=config.optim.pct_start,
      discriminative=config.optim.discriminative)
  try:
    if fresh:
      model = model_lib.build_model(model_config(config), seed=config.seed)
      graphdef, state = steps.init_train_state(model, tx)
      state = steps.replicate(state, mesh)
      del model
    else:  # Resuming: the checkpoint holds every weight; only shapes are needed.
      graphdef, state = steps.abstract_train_state(
          lambda: model_lib.RetinaNet(model_config(config, pretrained=False),
                                      rngs=nnx.Rngs(config.seed)),
          tx, NamedSharding(mesh, P()))
  except BaseException:
    ckpt.close()
    raise

  try:
    restored = ckpt.restore(state)
  except (ValueError, KeyError, TypeError) as e:
    ckpt.close()
    raise workdir_lib.WorkdirMismatch(
        f"{workdir}: its checkpoint does not fit this configuration ({str(e)[:200]}); "
        "use a new --workdir") from e
  if lead:
    workdir_lib.record(workdir, run_files)
  step, best_ap, partial = 0, None, {}
  if restored is not None:
    state, meta = restored
    step, best_ap, partial = int(meta["step"]), meta.get("best_ap"), meta.get("partial", {})
    logging.info("Resuming %s at step %d of %d.", workdir, step, total_steps)
  if lead:
    metric_writer.truncate(workdir, step)  # Rows of epochs the checkpoint does not hold.
  if step >= total_steps:
    ckpt.close()
    return TrainResult(_summary(workdir, write=lead), state)

  train_step = make_train_step(graphdef, tx, config, norm, mesh)
  eval_loss = make_eval_loss(graphdef, config, norm, mesh)
  writer = metric_writer.MetricWriter(workdir, enabled=lead)
  base_key = jax.random.key(config.seed)
  batches = data.train.batches(step)
  # Losses of the epoch so far (kept across an interruption, so that a resumed
  # run logs exactly the numbers of an uninterrupted one).
  pending: list[dict[str, Any]] = [{k: np.float32(v) for k, v in m.items()}
                                   for m in partial.get("pending", [])]
  epoch_losses: list[dict[str, float]] = list(partial.get("epoch_losses", []))
  status = "finished"
  # A bar on a terminal, a line every 30 s in a log file.
  bar = cli.Progress(total_steps, os.path.basename(workdir.rstrip("/")), "step", initial=step,
                     enabled=lead)
  t_epoch = time.perf_counter() - partial.get("seconds", 0.0)
  try:
    with _StopFlag() as stop:
      while step < total_steps:
        batch = next(batches)
        key = jax.random.fold_in(base_key, step)
        state, metrics = train_step(state, batch, key)
        pending.append(metrics)
        step += 1
        bar.update(1)
        epoch_end = step % steps_per_epoch == 0
        if step % config.log_every_steps == 0 or epoch_end or step == total_steps:
          m = _mean(pending)
          epoch_losses.append(m)
          pending = []
          if not all(np.isfinite(v) for v in m.values()):
            status = "diverged"
            break
          bar.set_postfix(f"loss {m['loss']:.4f}")
        if epoch_end or step == total_steps:
          epoch = step // steps_per_epoch
          record = {"epoch": epoch,
                    "train_loss": float(np.mean([m["loss"] for m in epoch_losses])),
                    "epoch_seconds": time.perf_counter() - t_epoch}
          epoch_losses = []
          val = _mean([eval_loss(state, b) for b in data.valid.batches(0, epochs=1)])
          record["valid_loss"] = val.get("loss")
          if data.validation_ap is not None and (
              epoch % config.eval.every_epochs == 0 or step == total_steps):
            record["valid_ap"] = float(data.validation_ap(graphdef, state, epoch))
          if record.get("valid_ap") is not None and (best_ap is None or record["valid_ap"] > best_ap):
            best_ap = record["valid_ap"]
          # The row first, then the commit: a kill between them leaves a row
          # past the checkpoint, which the resumed run drops (`truncate`).
          writer.write(step, record)
          ckpt.save(step, state, {"step": step, "best_ap": best_ap, **record})
          bar.write(_epoch_line(record, config.num_epochs))
          t_epoch = time.perf_counter()
        if stop.is_set():
          status = "interrupted"
          ckpt.save(step, state, {"step": step, "best_ap": best_ap, "partial": {
              "pending": _floats(pending), "epoch_losses": epoch_losses,
              "seconds": time.perf_counter() - t_epoch}})
          break
  finally:
    bar.close()
    ckpt.close()
    writer.close()
  if status == "diverged":
    raise TrainingDiverged(
        f"{workdir}: the loss is not finite at step {step}; stopping. The last good "
        "checkpoint is kept in checkpoints/. Lower optim.max_lr or check the data.")
  if status == "interrupted":
    logging.warning("Interrupted at step %d; run the same command again to resume.", step)
    return TrainResult({"status": "interrupted", "step": step}, state)
  return TrainResult(_summary(workdir, write=lead), state)


def _epoch_line(record: dict[str, Any], num_epochs: int) -> str:
  """E.g. "epoch 3/12: train loss 0.4123, valid loss 0.3987, valid AP 0.512 (14 s)"."""
  parts = [f"train loss {record['train_loss']:.4f}"]
  if record.get("valid_loss") is not None:
    parts.append(f"valid loss {record['valid_loss']:.4f}")
  if record.get("valid_ap") is not None:
    parts.append(f"valid AP {record['valid_ap']:.3f}")
  return (f"epoch {record['epoch']}/{num_epochs}: {', '.join(parts)} "
          f"({record['epoch_seconds']:.0f} s)")


def _summary(workdir: str, write: bool = False) -> dict[str, Any]:
  """The finished run's summary, derived from committed state only."""
  path = os.path.join(workdir, "summary.json")
  if os.path.exists(path):
    return files.read_json(path)
  ckpt = checkpoints.RunCheckpoints(workdir, read_only=True)
  try:
    last = ckpt.latest_step()
    best = ckpt.best_step()
    best_ap = ckpt.meta(best).get("valid_ap") if best is not None else None
  finally:
    ckpt.close()
  history = [r for r in metric_writer.read_metrics(workdir) if last is None or r["step"] <= last]
  summary = {
      "status": "finished",
      "epochs": len(history),
      "steps": last,
      "final": history[-1] if history else {},
      "best_valid_ap": best_ap,
      "best_step": best,
      "train_seconds": float(sum(r.get("epoch_seconds", 0) for r in history)),
  }
  if write:
    files.write_json(path, summary)
  return summary
