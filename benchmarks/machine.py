"""What a benchmark ran on, named one way for every benchmark and record."""

from __future__ import annotations

import os
import platform


def cpu_name() -> str:
  """The CPU's model name ("AMD EPYC ..."): /proc/cpuinfo on Linux, else Python's guess."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine() or "unknown CPU"


def cores() -> int:
  """Cores this process may use (a container's or taskset's limit, not the host's)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def describe() -> dict:
  """CPU, cores and the load when asked: what every printed figure carries."""
  return {"machine": cpu_name(), "cores": cores(), "load_average": os.getloadavg()[0]}
