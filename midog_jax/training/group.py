"""A run group: K runs of one network trained by one process, in one program.

At the paper's batch of 12 one run leaves a large accelerator idle; a group
stacks K runs' train states on a leading run axis and trains them with one
jitted step (`steps.make_group_train_step`): each run keeps its own batch
(from its own input pipeline, so its (seed, step, cases) stream is
unchanged), its own augmentation key and normalisation, its own BatchNorm
statistics, its own learning-rate schedule, while the device works on
12 * K images per step. Everything else is a single run's
(`trainer.Run`): each run's validation, model selection, checkpoints,
metrics and summary are written into its own workdir exactly as a single
run writes them, so evaluation and detection cannot tell the difference,
and a member can later be resumed alone (or in another group).

Members agree on what shapes the program (`PROGRAM_FIELDS`: network, patch
and batch size, loss, augmentation, and whether the learning rate is
discriminative); they may differ in data, fold, seed, epochs, patches per
epoch and learning rates. Runs of different lengths are handled: every
member steps at each group step until it has its own total; one that has
finished keeps its state (its rows of the stacked state are not updated)
while the others go on. A resumed group takes each member from its own
checkpoint, so members may be at different epochs, some finished; the
finished ones stay in the group, so that it runs the same program as before
the interruption and ends as the uninterrupted group, bit for bit (a group
of other members computes the same runs within the stated tolerance).

Floating point: each run's augmented images are those of the run trained
alone, bit for bit, and so are its batches, keys and learning-rate
schedule; its forward and backward passes and its optimiser update are
mapped over the run axis (`jax.vmap`), which XLA lowers with other
summation orders (some convolutions' weight gradients, the loss's sums)
and other vectorised loops, so a run's parameters differ from its single
run's in the last bits from the first step on. In a stable regime that
stays within a thousandth of what the weights move (measured:
tests/training/test_group.py); where training is chaotic (a high learning
rate from scratch) last-bit differences grow as between any two machines.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from midog_jax import console
from midog_jax import sharding
from midog_jax.training import inputs
from midog_jax.training import steps
from midog_jax.training import trainer
from midog_jax.training import workdir as workdir_lib

# Configuration fields that shape the group's one program: members must agree.
PROGRAM_FIELDS = ("patch_size", "batch_size", "model", "loss", "augment",
                  "optim.discriminative")
# Of those, fields that only choose initial weights: members may differ.
_INIT_ONLY = ("model.body_weights",)


class GroupMismatch(ValueError):
  """The runs of a group cannot share one program."""


def program_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{field: value} of the fields that shape a group's program (`PROGRAM_FIELDS`)."""
  flat = workdir_lib.flatten(json.loads(config.to_json_best_effort()))
  out = {k: v for k, v in flat.items()
         if any(k == f or k.startswith(f + ".") for f in PROGRAM_FIELDS) and k not in _INIT_ONLY}
  # Only whether the rate is discriminative shapes the optimiser's state; the rates may differ.
  out["optim.discriminative"] = "yes" if flat.get("optim.discriminative") else "no"
  return out


def check_members(configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str]) -> None:
  """Refuses, in one line, a group whose runs cannot be trained in one program."""
  if not configs or len(configs) != len(workdirs):
    raise GroupMismatch(f"run group: {len(configs)} configuration(s) for {len(workdirs)} "
                        "workdir(s); give one --config and one --workdir per run")
  seen: dict[str, int] = {}
  for k, w in enumerate(workdirs):
    path = os.path.abspath(w)
    if path in seen:
      raise GroupMismatch(f"run group: runs {seen[path]} and {k} share the workdir {w}; each "
                          "run needs its own")
    seen[path] = k
  first = program_fields(configs[0])
  for k, config in enumerate(configs[1:], 1):
    other = program_fields(config)
    for field in sorted(set(first) | set(other)):
      a, b = first.get(field, "(absent)"), other.get(field, "(absent)")
      if json.dumps(a) != json.dumps(b):
        raise GroupMismatch(
            f"run group: {workdirs[k]} has {field}={json.dumps(b)} but {workdirs[0]} has "
            f"{json.dumps(a)}; the runs of a group must agree on {', '.join(PROGRAM_FIELDS)}: "
            "train that run in another group")


def member_from_args(args: Sequence[str]) -> tuple[ml_collections.ConfigDict, str]:
  """(config, workdir) of one member given as `train` options ("--config F --workdir W ...")."""
  argv = ["member", *args]
  values = flags.FlagValues()  # The member's own: its --config.FIELD overrides are its own.
  config_flag = config_flags.DEFINE_config_file("config", None, "", flag_values=values,
                                                lock_config=True, sys_argv=argv)
  workdir_flag = flags.DEFINE_string("workdir", None, "", flag_values=values)
  try:
    values(argv)
    config = config_flag.value
    if config is None or not workdir_flag.value:
      raise ValueError("each --member needs --config and --workdir")
    if not 0 <= config.fold < config.num_folds:  # Also loads the file: its error shows here.
      raise ValueError(f"--config.fold={config.fold} is not in 0..{config.num_folds - 1}")
  except (flags.Error, OSError, ValueError, KeyError, AttributeError) as e:
    raise GroupMismatch(f"--member {' '.join(args)!r}: {e}") from None
  return config, workdir_flag.value


def members(arg_lists: Sequence[Sequence[str]]
            ) -> tuple[list[ml_collections.ConfigDict], list[str]]:
  """The configs and workdirs of a group given as each member's options, checked."""
  parsed = [member_from_args(args) for args in arg_lists]
  configs, workdirs = [c for c, _ in parsed], [w for _, w in parsed]
  check_members(configs, workdirs)
  return configs, workdirs


def train_group(configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str],
                datas: Sequence[inputs.RunData], mesh=None) -> list[trainer.TrainResult]:
  """Trains (or resumes) the runs of a group together, one result per run.

  Holds every member's workdir lock meanwhile. `datas` are the members'
  `inputs.build` results, on `mesh` (default: the first one's mesh). A
  member whose loss stops being finite stops (its last good checkpoint
  kept) while the others go on; TrainingDiverged is raised at the end.
  """
  check_members(configs, workdirs)
  workdirs = [os.path.abspath(w) for w in workdirs]
  mesh = mesh or datas[0].train.mesh
  for w, d in zip(workdirs, datas):
    if d.train.mesh != mesh:
      raise GroupMismatch(f"run group: the data of {w} was built for another device mesh; "
                          "build every member's data on the group's mesh")
  lead = jax.process_index() == 0
  locks = []
  try:
    for w in workdirs:
      workdir_lib.make(w)
      if lead:
        locks.append(workdir_lib.Lock(w).acquire())
    return _train_group(configs, workdirs, datas, mesh, lead)
  finally:
    for lock in locks:
      lock.release()


def _label(workdir: str) -> str:
  """"<experiment>/fold<k>": a member's name in the group's lines."""
  return "/".join(workdir.rstrip("/").split(os.sep)[-2:])


def _train_group(configs, workdirs, datas, mesh, lead: bool) -> list[trainer.TrainResult]:
  runs: list[trainer.Run] = []
  try:
    for c, w, d in zip(configs, workdirs, datas):
      runs.append(trainer.Run(c, w, d, mesh, lead))
  except BaseException:
    for r in runs:
      r.close()
    raise
  if all(r.finished for r in runs):
    return [r.result(r.state) for r in runs]
  return _train_together(runs, mesh, lead)


def _tx_groups(runs: Sequence[trainer.Run]) -> list[tuple[Any, tuple[int, ...]]]:
  """((optimiser, member indices), ...): members of one schedule share an optimiser."""
  by_key: dict[str, list[int]] = {}
  for k, r in enumerate(runs):
    key = json.dumps([r.config.optim.to_dict(), r.config.model.get("backbone"), r.total_steps],
                     sort_keys=True, default=str)
    by_key.setdefault(key, []).append(k)
  return [(runs[ks[0]].tx, tuple(ks)) for ks in by_key.values()]


def _train_together(runs: list[trainer.Run], mesh, lead: bool) -> list[trainer.TrainResult]:
  """The group's loop until every member has its own total of steps.

  The members stay those of the group throughout, finished or not, so a
  resumed group runs the very program of the uninterrupted one.
  """
  n = len(runs)
  rep = sharding.replicated(mesh)
  stack = jax.jit(lambda *states: jax.tree.map(lambda *xs: jnp.stack(xs), *states),
                  out_shardings=rep)
  take = jax.jit(lambda state, k: jax.tree.map(lambda x: x[k], state), out_shardings=rep)
  state = stack(*(r.state for r in runs))
  for r in runs:
    r.state = None  # The stacked copy is the only one kept.
  base_keys = jax.device_put(jnp.stack([r.base_key for r in runs]), rep)
  step_fn = steps.make_group_train_step(runs[0].graphdef, _tx_groups(runs), runs[0].config,
                                        [r.data.normalization for r in runs], mesh)
  batches = [r.data.train.batches(r.step) for r in runs]
  # A finished run's last batch stands in for it (any batch of its shapes would).
  last: list[Any] = [None if r.status == "training" else next(batches[k])
                     for k, r in enumerate(runs)]
  results: list[trainer.TrainResult | None] = [None] * n
  for k, r in enumerate(runs):
    if r.finished:
      results[k] = r.result(take(state, k))
  bar = console.Progress(max(r.total_steps - r.step for r in runs), f"group of {n}", "step",
                         enabled=lead)
  for r in runs:
    if r.status == "training":
      r.start(bar, prefix=f"{_label(r.workdir)}: ")
  try:
    with trainer.StopFlag() as stop:
      while any(r.status == "training" for r in runs):
        active = np.array([r.status == "training" for r in runs])
        for k in np.flatnonzero(active):
          last[k] = next(batches[k])
        run_steps = np.array([r.step for r in runs], np.int32)
        state, metrics = step_fn(state, tuple(last), base_keys, run_steps, active)
        bar.update(1)
        for k in np.flatnonzero(active):
          r = runs[k]
          r.after_step((metrics, k), lambda k=k: take(state, k))
          if r.status == "finished":  # Its summary at once: the launcher sees it done.
            results[k] = r.result(take(state, k))
        if stop.is_set():
          for k, r in enumerate(runs):
            if r.status == "training":
              r.interrupt(take(state, k))
          break
  finally:
    bar.close()
    for r in runs:
      r.close()
  diverged = []
  for k, r in enumerate(runs):
    if results[k] is None:
      try:
        results[k] = r.result(take(state, k))
      except trainer.TrainingDiverged as e:
        diverged.append(str(e))
  if diverged:
    raise trainer.TrainingDiverged("; ".join(diverged))
  return results
