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
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from midog_jax import atomic
from midog_jax import console
from midog_jax import sharding
from midog_jax.model import retinanet
from midog_jax.training import checkpoints
from midog_jax.training import inputs
from midog_jax.training import metric_writer
from midog_jax.training import optim
from midog_jax.training import selection
from midog_jax.training import steps
from midog_jax.training import workdir as workdir_lib


class TrainingDiverged(RuntimeError):
  """The loss became NaN or infinite."""


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
class TrainResult:
  summary: dict[str, Any]  # As written to summary.json.
  state: Any  # Final steps.TrainState (None when the run was already done).


def _run_files(config, data: inputs.RunData) -> dict[str, Any]:
  """What identifies the run; recorded at its first start, compared later."""
  return {"config.json": json.loads(config.to_json_best_effort()), "cases.json": data.meta,
          "normalization.json": data.normalization.to_json()}


def train(config: ml_collections.ConfigDict, workdir: str, data: inputs.RunData,
          mesh=None) -> TrainResult:
  """Trains (or resumes) the run in `workdir`, holding its lock meanwhile."""
  workdir = os.path.abspath(workdir)
  workdir_lib.make(workdir)
  lead = jax.process_index() == 0
  lock = workdir_lib.Lock(workdir).acquire() if lead else None
  try:
    return _train(config, workdir, data, mesh or sharding.make_mesh(), lead)
  finally:
    if lock is not None:
      lock.release()


def _floats(values: list[dict[str, jax.Array]]) -> list[dict[str, float]]:
  return [{k: float(v) for k, v in m.items()} for m in jax.device_get(values)]


def _train(config, workdir: str, data: inputs.RunData, mesh, lead: bool) -> TrainResult:
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
  tx = optim.from_config(config, total_steps)
  try:
    if fresh:
      model = retinanet.build_model(retinanet.RetinaNetConfig.from_config(config), seed=config.seed)
      graphdef, state = steps.init_train_state(model, tx)
      state = sharding.replicate(state, mesh)
      del model
    else:  # Resuming: the checkpoint holds every weight; only shapes are needed.
      graphdef, state = steps.abstract_train_state(
          lambda: retinanet.RetinaNet(
              retinanet.RetinaNetConfig.from_config(config, pretrained=False),
              rngs=nnx.Rngs(config.seed)),
          tx, sharding.replicated(mesh))
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
  except BaseException:  # E.g. every step damaged: said by RunCheckpoints in one line.
    ckpt.close()
    raise
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

  train_step = steps.make_batch_train_step(graphdef, tx, config, norm, mesh)
  eval_loss = steps.make_batch_eval_loss(graphdef, config, norm, mesh)
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
  bar = console.Progress(total_steps, os.path.basename(workdir.rstrip("/")), "step", initial=step,
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
            measured = selection.measured(data.validation_ap(graphdef, state, epoch))
            record["valid_ap"] = measured.value
            if measured.figures is not None:
              record.update(valid_figures=measured.figures,
                            valid_figures_counted=measured.counted)
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
    return atomic.read_json(path)
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
  name = atomic.read_json(os.path.join(workdir, "config.json"))["eval"]["selection"]
  note = selection.check_choice(history, best, name)
  if note:
    summary["selection_warning"] = note
  if write:
    atomic.write_json(path, summary)
    if note:
      logging.warning("%s: %s", workdir, note)
  return summary
