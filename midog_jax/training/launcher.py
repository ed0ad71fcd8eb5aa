"""The paper's experiment plans, and a launcher that trains them as processes.

`run_plan` trains every run of a plan (or of its shard) that is neither
finished nor running, `parallel` at once, each a subprocess pinned to one
device. With `group` K, each subprocess trains K runs together, in plan
order, as a run group (`group.py`: one program on its device); the runs of
a plan differ only in their data (tumour types, fold), which a group
allows, and the training process refuses any other mix in one line. A
launcher claims a run's workdir before starting it and holds the claim
while it trains (`workdir.claim`), so several launchers (on one machine, or
a job array on a shared file system) never train a run twice. The command
line is `python -m midog_jax.experiments run`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import IO

from configs import leave_one_domain_out
from midog_jax import console
from midog_jax import domains
from midog_jax.training import workdir as workdir_lib

PLANS = ("single_domain", "leave_one_out", "all", "paper", "leave_one_scanner_out")
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
  if plan == "leave_one_scanner_out":  # Breast-carcinoma scanners, one left out, per stain switch.
    return leave_one_domain_out.plan()
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


def _table(runs, states, durations, parallel: int = 1, groups: dict[str, int] | None = None
           ) -> str:
  """The plan's runs and their states; `groups` names the run group each was trained in.

  `durations` are seconds per run (a group's time over its runs).
  """
  done = sum(s == "done" for s in states.values())
  left = len(runs) - done
  eta = (f", about {sum(durations) / len(durations) * left / parallel / 3600:.1f} h left"
         if durations and left else "")
  lines = [f"{done}/{len(runs)} runs done{eta}"]
  groups = groups or {}
  width = max(map(len, runs), default=0) if groups else 0
  lines += [f"  {states[r]:8s} {r:{width}s}" + (f"  group {groups[r]}" if r in groups else "")
            for r in runs]
  return "\n".join(line.rstrip() for line in lines)


@dataclasses.dataclass(frozen=True)
class Launch:
  """How the runs of a plan are trained."""
  workdir: str  # Runs go to WORKDIR/<experiment>/fold<k>.
  data_dir: str | None = None
  hardware: str = "cpu"  # One of HARDWARE.
  overrides: Sequence[str] = ()  # "key=value" config overrides for every run.
  parallel: int = 1  # Processes at once, each on one device.
  group: int = 1  # Runs per process, trained together as a run group.


@dataclasses.dataclass
class _Running:
  runs: list[str]
  proc: subprocess.Popen
  claims: list[workdir_lib.Lock]
  start: float
  log: IO | None


def run_args(args: Launch, run: str, spec: str) -> list[str]:
  """The `train` options of one run of the plan."""
  out = ["--config", config_arg(spec, args.hardware), "--workdir", os.path.join(args.workdir, run),
         f"--config.fold={run.rsplit('fold', 1)[1]}"]
  if args.data_dir:
    out.append(f"--config.data_dir={args.data_dir}")
  if (args.parallel > 1 or args.group > 1) and not any(
      kv.startswith("input_workers=") for kv in args.overrides):
    # The cores are shared by the runs: each crops with its share of them.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    out.append(f"--config.input_workers={max(1, (cores or 1) // (args.parallel * args.group))}")
  return out + [f"--config.{kv}" for kv in args.overrides]


def train_command(args: Launch, members: Sequence[tuple[str, str]]) -> list[str]:
  """The command that trains `members` ((run, spec), ...): one run, or a run group."""
  if len(members) == 1:
    return [*TRAIN_COMMAND, *run_args(args, *members[0])]
  return [*TRAIN_COMMAND, *(a for run, spec in members
                            for a in ("--member", shlex.join(run_args(args, run, spec))))]


def _start(args: Launch, members: list[tuple[str, str]], slot: int, claims) -> _Running:
  runs = [run for run, _ in members]
  env = {**os.environ, **device_env(args.hardware, slot, args.parallel)}
  log = None
  if args.parallel > 1:  # Progress bars of several processes would interleave.
    log = open(os.path.join(args.workdir, runs[0], "train.log"), "a", encoding="utf-8")
    what = runs[0] if len(runs) == 1 else f"group of {len(runs)} ({', '.join(runs)})"
    print(f"{what}: started on device slot {slot}, output in {log.name}", flush=True)
  proc = subprocess.Popen(train_command(args, members), env=env, stdout=log, stderr=log)
  return _Running(runs, proc, claims, time.time(), log)


def run_plan(args: Launch, plan: str, folds: Sequence[int], part: str | None = None) -> int:
  """Trains the runs of `plan` (of its `part` "i/n" if given); the exit code."""
  if args.parallel < 1:
    raise ValueError(f"--parallel {args.parallel}: expected 1 or more")
  if args.group < 1:
    raise ValueError(f"--group {args.group}: expected 1 or more")
  runs = plan_runs(plan, folds)
  if part:
    runs = shard(runs, *parse_shard(part))
  names = [r for r, _ in runs]
  path = {r: os.path.join(args.workdir, r) for r in names}
  pending, running, elsewhere = list(runs), {}, set()
  durations, failed, groups = [], 0, {}

  def states():
    out = {r: run_status(path[r]) for r in names}
    out.update({r: "running elsewhere" for r in elsewhere if out[r] != "done"})
    out.update({r: "running" for p in running.values() for r in p.runs})
    return out

  def table():
    return _table(names, states(), durations, args.parallel, groups if args.group > 1 else None)

  def claim_next(count: int):
    """Up to `count` runs left to train, in plan order, each claimed."""
    members, claims = [], []
    while pending and len(members) < count:
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
      members.append((run, spec))
      claims.append(claim)
    return members, claims

  def release(p: _Running):
    for c in p.claims:
      c.release()
    if p.log is not None:
      p.log.close()

  with console.sigterm_as_interrupt():
    try:
      while pending or running:
        changed = False
        while pending and len(running) < args.parallel and not failed:
          members, claims = claim_next(args.group)
          if not members:
            continue
          slot = min(set(range(args.parallel)) - set(running))
          running[slot] = _start(args, members, slot, claims)
          number = len(set(groups.values())) + 1  # Groups in the order they started.
          groups.update({r: number for r, _ in members})
          changed = True
        if changed:
          print(table(), flush=True)
        if not running:
          break
        for slot, p in list(running.items()):
          code = p.proc.poll()
          if code is None:
            continue
          del running[slot]
          release(p)
          unfinished = [r for r in p.runs if run_status(path[r]) != "done"]
          if code != 0 or unfinished:
            what = p.runs[0] if len(p.runs) == 1 else f"the group of {', '.join(p.runs)}"
            log = os.path.join(path[p.runs[0]], "train.log")
            where = f"its log is {log}" if os.path.exists(log) else "its output is above"
            print(f"error: {what} stopped (exit code {code}); {where}", file=sys.stderr,
                  flush=True)
            failed = failed or code or 1  # Runs in progress finish; no new ones start.
          else:
            durations += [(time.time() - p.start) / len(p.runs)] * len(p.runs)
        time.sleep(0.2)
    except KeyboardInterrupt:  # The runs save their checkpoints on SIGINT too.
      for p in running.values():
        p.proc.send_signal(signal.SIGINT)
      for p in running.values():
        p.proc.wait()
        release(p)
      print("interrupted; run the same command again to resume", file=sys.stderr)
      return 130
  print(table(), flush=True)
  return failed
