"""The training loop: one (experiment, fold) run in a work directory.

Data parallel with `jax.jit` over a one-axis mesh: parameters replicated,
batches sharded on "data", so BatchNorm statistics and the loss are over the
global batch. Augmentation runs on the device inside the jitted step. The
batch and the augmentation key at step k depend only on (seed, k, cases), so
a run interrupted (SIGTERM, Ctrl-C) and resumed ends as an uninterrupted one.
`Run` holds one run's bookkeeping around its steps, so that a run group
(`group.py`, K runs in one program) writes each run as a single run does.
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


class StopFlag:
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


def _mean(values: list[Any]) -> dict[str, float]:
  if not values:
    return {}
  stacked = _host_rows(values)
  return {k: float(np.mean([v[k] for v in stacked])) for k in stacked[0]}


@dataclasses.dataclass
class TrainResult:
  summary: dict[str, Any]  # As written to summary.json.
  state: Any  # Final steps.TrainState (None when the run was already done).


def _run_files(config, data: inputs.RunData) -> dict[str, Any]:
  """What identifies the run; recorded at its first start, compared later."""
  return {"config.json": json.loads(config.to_json_best_effort()), **data.run_files()}


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


def _floats(values: list[Any]) -> list[dict[str, float]]:
  return [{k: float(v) for k, v in m.items()} for m in _host_rows(values)]


def _host_rows(values: list[Any]) -> list[dict[str, Any]]:
  """Metrics rows on the host; a `(metrics of a group, run)` entry gives that run's row."""
  rows = []
  for v in values:
    if isinstance(v, tuple):  # Fetched once per group step, then cached by the arrays.
      stacked, k = jax.device_get(v[0]), v[1]
      rows.append({name: x[k] for name, x in stacked.items()})
    else:
      rows.append(jax.device_get(v))
  return rows


class Run:
  """One run's life around its train steps, shared by a single run and a run group.

  Opening checks the workdir, builds (or restores) the train state and
  records the run's files; `after_step` does the per-step bookkeeping
  (losses, divergence, and at an epoch's end validation, the metrics row
  and the checkpoint); `interrupt` saves mid-epoch; `result` closes and
  summarises. The steps themselves are the caller's: a single run calls
  its train step, a group one program for all its runs.
  """

  def __init__(self, config, workdir: str, data: inputs.RunData, mesh, lead: bool):
    self.config, self.workdir, self.data, self.mesh, self.lead = config, workdir, data, mesh, lead
    self.name = os.path.basename(workdir.rstrip("/"))
    run_files = _run_files(config, data)
    changed = workdir_lib.check(workdir, run_files, config.get("resume_anyway", False))
    if changed:
      logging.warning("Continuing %s with changed settings: %s", workdir, "; ".join(changed))
    self.steps_per_epoch = data.train.steps_per_epoch
    data.valid.steps_per_epoch  # A validation set too small for one batch fails here, not later.
    self.total_steps = self.steps_per_epoch * config.num_epochs
    self.ckpt = checkpoints.RunCheckpoints(workdir)
    self.tx = optim.from_config(config, self.total_steps)
    try:
      self.graphdef, state = self._initial_state(self.ckpt.latest_step() is None)
      restored = self.ckpt.restore(state)
    except (ValueError, KeyError, TypeError) as e:
      self.ckpt.close()
      raise workdir_lib.WorkdirMismatch(
          f"{workdir}: its checkpoint does not fit this configuration ({str(e)[:200]}); "
          "use a new --workdir") from e
    except BaseException:  # E.g. every step damaged: said by RunCheckpoints in one line.
      self.ckpt.close()
      raise
    if lead:
      workdir_lib.record(workdir, run_files)
    self.step, self.best_ap, partial = 0, None, {}
    if restored is not None:
      state, meta = restored
      self.step, self.best_ap = int(meta["step"]), meta.get("best_ap")
      partial = meta.get("partial", {})
      if self.step >= self.total_steps:
        logging.info("%s is finished (step %d of %d); nothing to train.", workdir, self.step,
                     self.total_steps)
      else:
        logging.info("Resuming %s at step %d of %d.", workdir, self.step, self.total_steps)
    self.state = state
    if lead:
      metric_writer.truncate(workdir, self.step)  # Rows of epochs the checkpoint does not hold.
    self.base_key = jax.random.key(config.seed)
    # Losses of the epoch so far (kept across an interruption, so that a resumed
    # run logs exactly the numbers of an uninterrupted one).
    self.pending: list[Any] = [{k: np.float32(v) for k, v in m.items()}
                               for m in partial.get("pending", [])]
    self.epoch_losses: list[dict[str, float]] = list(partial.get("epoch_losses", []))
    self._seconds = partial.get("seconds", 0.0)
    self.status = "finished" if self.finished else "training"
    self.writer = self.eval_loss = self.bar = None

  def _initial_state(self, fresh: bool):
    config = self.config
    if fresh:
      model = retinanet.build_model(retinanet.RetinaNetConfig.from_config(config), seed=config.seed)
      graphdef, state = steps.init_train_state(model, self.tx)
      return graphdef, sharding.replicate(state, self.mesh)
    # Resuming: the checkpoint holds every weight; only shapes are needed.
    return steps.abstract_train_state(
        lambda: retinanet.RetinaNet(retinanet.RetinaNetConfig.from_config(config, pretrained=False),
                                    rngs=nnx.Rngs(config.seed)),
        self.tx, sharding.replicated(self.mesh))

  @property
  def finished(self) -> bool:
    return self.step >= self.total_steps

  def start(self, bar: console.Progress, prefix: str = "") -> None:
    """Opens the metrics and the validation step; `bar` shows the progress."""
    self.bar, self._prefix = bar, prefix
    self.writer = metric_writer.MetricWriter(self.workdir, enabled=self.lead)
    self.eval_loss = steps.make_batch_eval_loss(self.graphdef, self.config,
                                                self.data.normalization, self.mesh)
    self.t_epoch = time.perf_counter() - self._seconds

  def after_step(self, metrics: Any, state: Callable[[], Any]) -> bool:
    """Books one train step's `metrics`; False when the loss is no longer finite.

    `state()` gives the run's state after the step (read at an epoch's end).
    """
    config = self.config
    self.pending.append(metrics)
    self.step += 1
    step, epoch_end = self.step, self.step % self.steps_per_epoch == 0
    if step % config.log_every_steps == 0 or epoch_end or step == self.total_steps:
      m = _mean(self.pending)
      self.epoch_losses.append(m)
      self.pending = []
      if not all(np.isfinite(v) for v in m.values()):
        self.status = "diverged"
        return False
      self.bar.set_postfix(f"{self._prefix}loss {m['loss']:.4f}")
    if epoch_end or step == self.total_steps:
      self._end_epoch(state())
    if self.finished:
      self.status = "finished"
    return True

  def _end_epoch(self, state) -> None:
    """Validation, the metrics row and the checkpoint of the epoch that ends now."""
    config, data, step = self.config, self.data, self.step
    epoch = step // self.steps_per_epoch
    record = {"epoch": epoch,
              "train_loss": float(np.mean([m["loss"] for m in self.epoch_losses])),
              "epoch_seconds": time.perf_counter() - self.t_epoch}
    self.epoch_losses = []
    val = _mean([self.eval_loss(state, b) for b in data.valid.batches(0, epochs=1)])
    record["valid_loss"] = val.get("loss")
    if data.validation_ap is not None and (
        epoch % config.eval.every_epochs == 0 or step == self.total_steps):
      measured = selection.measured(data.validation_ap(self.graphdef, state, epoch))
      record["valid_ap"] = measured.value
      if measured.figures is not None:
        record.update(valid_figures=measured.figures, valid_figures_counted=measured.counted)
    if record.get("valid_ap") is not None and (self.best_ap is None
                                               or record["valid_ap"] > self.best_ap):
      self.best_ap = record["valid_ap"]
    # The row first, then the commit: a kill between them leaves a row
    # past the checkpoint, which the resumed run drops (`truncate`).
    self.writer.write(step, record)
    self.ckpt.save(step, state, {"step": step, "best_ap": self.best_ap, **record})
    self.bar.write(self._prefix + _epoch_line(record, config.num_epochs))
    self.t_epoch = time.perf_counter()

  def interrupt(self, state) -> None:
    """Saves the step reached mid-epoch, with the losses logged so far."""
    self.status = "interrupted"
    self.ckpt.save(self.step, state, {"step": self.step, "best_ap": self.best_ap, "partial": {
        "pending": _floats(self.pending), "epoch_losses": self.epoch_losses,
        "seconds": time.perf_counter() - self.t_epoch}})

  def close(self) -> None:
    """Closes the checkpoints and the metrics (again: nothing)."""
    if self.ckpt is not None:
      self.ckpt.close()
      self.ckpt = None
    if self.writer is not None:
      self.writer.close()
      self.writer = None

  def diverged_message(self) -> str:
    return (f"{self.workdir}: the loss is not finite at step {self.step}; stopping. The last "
            "good checkpoint is kept in checkpoints/. Lower optim.max_lr or check the data.")

  def result(self, state) -> TrainResult:
    """The run's result once its steps are over (closed first); raises if it diverged."""
    self.close()
    if self.status == "diverged":
      raise TrainingDiverged(self.diverged_message())
    if self.status == "interrupted":
      logging.warning("%s: interrupted at step %d; run the same command again to resume.",
                      self.name, self.step)
      return TrainResult({"status": "interrupted", "step": self.step}, state)
    return TrainResult(_summary(self.workdir, write=self.lead), state)


def _train(config, workdir: str, data: inputs.RunData, mesh, lead: bool) -> TrainResult:
  run = Run(config, workdir, data, mesh, lead)
  if run.finished:
    return run.result(run.state)
  train_step = steps.make_batch_train_step(run.graphdef, run.tx, config, data.normalization, mesh)
  batches = data.train.batches(run.step)
  # A bar on a terminal, a line every 30 s in a log file.
  bar = console.Progress(run.total_steps, run.name, "step", initial=run.step, enabled=lead)
  run.start(bar)
  state = run.state
  try:
    with StopFlag() as stop:
      while not run.finished:
        key = jax.random.fold_in(run.base_key, run.step)
        state, metrics = train_step(state, next(batches), key)
        bar.update(1)
        if not run.after_step(metrics, lambda: state):
          break
        if stop.is_set() and not run.finished:
          run.interrupt(state)
          break
  finally:
    bar.close()
    run.close()
  return run.result(state)


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
