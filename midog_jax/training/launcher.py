"""The paper's experiment plans, and a launcher that trains them as processes.

`run_plan` trains every run of a plan (or of its shard) that is neither
finished nor running, `parallel` at once, each a subprocess pinned to one
device. A launcher claims a run's workdir before starting it and holds the
claim while it trains (`workdir.claim`), so several launchers (on one
machine, or a job array on a shared file system) never train a run twice.
The command line is `python -m midog_jax.experiments run`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import IO

from midog_jax import console
from midog_jax import domains
from midog_jax.training import workdir as workdir_lib

PLANS = ("single_domain", "leave_one_out", "all", "paper")
# gpu/tpu keep the paper's protocol (batch 12, bf16); *_large_batch do not.
HARDWARE = ("cpu", "gpu", "tpu", "gpu_large_batch", "tpu_large_batch")
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_COMMAND = (sys.executable, "-m", "midog_jax.train")  # + --config, --workdir, ...
_TPU_PORT = 8476  # libtpu's first port; each process on one TPU VM needs its own.


def plan_experiments(plan: str) -> list[tuple[str, str]]:
  """(run name, experiment spec for configs.common.experiment_config)."""
  single = [(f"single_{t}", f"single_domain={t}") for t in domains.TUMOR_SLUGS]
  loo = [(f"without_{t}", f"leave_one_out={t}") for t in domains.TUMOR_SLUGS]
  everything = [("all_domains", "all_domains")]
  return {"single_domain": single, "leave_one_out": loo, "all": everything,
          "paper": single + loo + everything}[plan]


def plan_runs(plan: str, folds: Sequence[int]) -> list[tuple[str, str]]:
  """("<experiment>/fold<k>", spec) of every run of `plan`, in a fixed order."""
  return [(f"{name}/fold{k}", spec) for name, spec in plan_experiments(plan) for k in folds]


def parse_shard(text: str) -> tuple[int, int]:
  """"i/n" -> (i, n) with 0 <= i < n."""
  m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
  if not m or not int(m[1]) < int(m[2]):
    raise ValueError(f"--shard {text!r}: expected i/n with 0 <= i < n, e.g. 0/4")
  return int(m[1]), int(m[2])


def shard(runs: Sequence, index: int, count: int) -> list:
  """The `index`-th of `count` disjoint parts of `runs`, which together are
  all of them. Round robin, so every part mixes experiments and folds."""
  return list(runs[index::count])


def config_arg(spec: str, hardware: str) -> str:
  """The --config value of one experiment on the chosen hardware."""
  configs = os.path.join(_ROOT, "configs")
  if hardware != "cpu":
    return f"{configs}/{hardware}.py:{spec}"
  kind, _, tumor = spec.partition("=")
  return f"{configs}/{kind}.py" + (f":{tumor}" if tumor else "")


def device_env(hardware: str, slot: int, parallel: int,
               environ: dict[str, str] | None = None) -> dict[str, str]:
  """Environment variables that give a run device `slot` of this machine.

  Nothing for one run at a time or on the CPU. GPUs: the slot-th entry of
  CUDA_VISIBLE_DEVICES (or GPU `slot`). TPU: chip `slot`, as a process of
  its own (libtpu's per-process chip bounds and its own port).
  """
  if parallel == 1 or hardware == "cpu":
    return {}
  environ = os.environ if environ is None else environ
  if hardware.startswith("gpu"):
    visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    ids = visible or [str(i) for i in range(parallel)]
    if len(ids) < parallel:
      raise ValueError(f"--parallel {parallel} needs {parallel} GPUs; CUDA_VISIBLE_DEVICES "
                       f"lists {len(ids)}")
    return {"CUDA_VISIBLE_DEVICES": ids[slot]}
  port = str(_TPU_PORT + slot)
  return {"TPU_VISIBLE_CHIPS": str(slot), "TPU_VISIBLE_DEVICES": str(slot),
          "TPU_CHIPS_PER_PROCESS_BOUNDS": "1,1,1", "TPU_PROCESS_BOUNDS": "1,1,1",
          "TPU_PROCESS_PORT": port, "TPU_PROCESS_ADDRESSES": f"localhost:{port}",
          "TPU_MESH_CONTROLLER_PORT": port, "TPU_MESH_CONTROLLER_ADDRESS": f"localhost:{port}",
          "CLOUD_TPU_TASK_ID": "0"}


def run_status(workdir: str) -> str:
  """'done', 'started' (has checkpoints, not finished) or 'left'."""
  summary = os.path.join(workdir, "summary.json")
  if os.path.exists(summary):
    with open(summary, encoding="utf-8") as f:
      if json.load(f).get("status") == "finished":
        return "done"
  return "started" if os.path.isdir(os.path.join(workdir, "checkpoints")) else "left"


def _table(runs, states, durations, parallel: int = 1) -> str:
  done = sum(s == "done" for s in states.values())
  left = len(runs) - done
  eta = (f", about {sum(durations) / len(durations) * left / parallel / 3600:.1f} h left"
         if durations and left else "")
  lines = [f"{done}/{len(runs)} runs done{eta}"]
  lines += [f"  {states[r]:8s} {r}" for r in runs]
  return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Launch:
  """How the runs of a plan are trained."""
  workdir: str  # Runs go to WORKDIR/<experiment>/fold<k>.
  data_dir: str | None = None
  hardware: str = "cpu"  # One of HARDWARE.
  overrides: Sequence[str] = ()  # "key=value" config overrides for every run.
  parallel: int = 1  # Runs at once, each a process on one device.


@dataclasses.dataclass
class _Running:
  run: str
  proc: subprocess.Popen
  claim: workdir_lib.Lock
  start: float
  log: IO | None


def _start(args: Launch, run: str, spec: str, slot: int, claim) -> _Running:
  workdir = os.path.join(args.workdir, run)
  cmd = [*TRAIN_COMMAND, "--config", config_arg(spec, args.hardware), "--workdir", workdir,
         f"--config.fold={run.rsplit('fold', 1)[1]}"]
  if args.data_dir:
    cmd.append(f"--config.data_dir={args.data_dir}")
  if args.parallel > 1 and not any(kv.startswith("input_workers=") for kv in args.overrides):
    # The cores are shared by the runs: each crops with its share of them.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cmd.append(f"--config.input_workers={max(1, (cores or 1) // args.parallel)}")
  cmd += [f"--config.{kv}" for kv in args.overrides]
  env = {**os.environ, **device_env(args.hardware, slot, args.parallel)}
  log = None
  if args.parallel > 1:  # Progress bars of several runs would interleave.
    log = open(os.path.join(workdir, "train.log"), "a", encoding="utf-8")
    print(f"{run}: started on device slot {slot}, output in {log.name}", flush=True)
  proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
  return _Running(run, proc, claim, time.time(), log)


def run_plan(args: Launch, plan: str, folds: Sequence[int], part: str | None = None) -> int:
  """Trains the runs of `plan` (of its `part` "i/n" if given); the exit code."""
  if args.parallel < 1:
    raise ValueError(f"--parallel {args.parallel}: expected 1 or more")
  runs = plan_runs(plan, folds)
  if part:
    runs = shard(runs, *parse_shard(part))
  names = [r for r, _ in runs]
  path = {r: os.path.join(args.workdir, r) for r in names}
  pending, running, elsewhere = list(runs), {}, set()
  durations, failed = [], 0

  def states():
    out = {r: run_status(path[r]) for r in names}
    out.update({r: "running elsewhere" for r in elsewhere if out[r] != "done"})
    out.update({r.run: "running" for r in running.values()})
    return out

  with console.sigterm_as_interrupt():
    try:
      while pending or running:
        changed = False
        while pending and len(running) < args.parallel and not failed:
          run, spec = pending.pop(0)
          if run_status(path[run]) == "done":
            continue
          claim = workdir_lib.claim(path[run])
          if claim is None:  # Another launcher's, or trained by hand.
            elsewhere.add(run)
            continue
          if run_status(path[run]) == "done":  # Finished since the first look.
            claim.release()
            continue
          slot = min(set(range(args.parallel)) - set(running))
          running[slot] = _start(args, run, spec, slot, claim)
          changed = True
        if changed:
          print(_table(names, states(), durations, args.parallel), flush=True)
        if not running:
          break
        for slot, r in list(running.items()):
          code = r.proc.poll()
          if code is None:
            continue
          del running[slot]
          r.claim.release()
          if r.log is not None:
            r.log.close()
          if code != 0 or run_status(path[r.run]) != "done":
            print(f"error: {r.run} stopped (exit code {code}); see {path[r.run]}",
                  file=sys.stderr, flush=True)
            failed = failed or code or 1  # Runs in progress finish; no new ones start.
          else:
            durations.append(time.time() - r.start)
        time.sleep(0.2)
    except KeyboardInterrupt:  # The runs save their checkpoints on SIGINT too.
      for r in running.values():
        r.proc.send_signal(signal.SIGINT)
      for r in running.values():
        r.proc.wait()
        r.claim.release()
      print("interrupted; run the same command again to resume", file=sys.stderr)
      return 130
  print(_table(names, states(), durations, args.parallel), flush=True)
  return failed
