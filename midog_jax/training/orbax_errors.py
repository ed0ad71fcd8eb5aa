"""Orbax failures in one line: the reason, the remedy, and the noise held back.

A failed save or read of Orbax (TensorStore underneath) sets off hundreds of
log records, asyncio tracebacks and unraisable exceptions, some of them late,
from background work it abandons. `quiet_orbax` holds them back while a call
runs (and lets them through when it succeeds); `reason` and `remedy` turn
the error into the one line a command prints.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sys
import warnings
from typing import Any, Iterator

import orbax.checkpoint as ocp

_ORBAX_DIR = os.path.dirname(ocp.__file__)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
_FULL = (errno.ENOSPC, errno.EDQUOT)
_REASON_CHARS = 300  # Of an exception's text in a one-line message.
_PAYLOAD = re.compile(r"\s*\[[\w\[\]]+='(?:[^'\\]|\\.)*'\]")


def is_memory(e: BaseException) -> bool:
  """Out of host or device memory: no fault of the files."""
  return isinstance(e, MemoryError) or "out of memory" in str(e).lower()


def _chain(e: BaseException) -> Iterator[BaseException]:
  """`e` and its causes, outermost first (as a traceback shows them)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)


def reason(e: BaseException) -> str:
  """The innermost cause of `e` on one line, e.g. "ValueError: OUT_OF_RANGE: ..."."""
  inner = list(_chain(e))[-1]
  # Orbax appends a TensorStore spec of dozens of lines to its read errors,
  # TensorStore its specs as [key='JSON'] payloads.
  text = str(inner).split(" See full TensorStore details")[0]
  return shorten(f"{type(inner).__name__}: {' '.join(_PAYLOAD.sub('', text).split())}")


def shorten(text: str, limit: int = _REASON_CHARS) -> str:
  """`text` cut in the middle to `limit` characters: the end names the cause
  (e.g. "No space left on device")."""
  if len(text) <= limit:
    return text
  return f"{text[:limit // 3]} ... {text[-2 * limit // 3:]}"


def _errno(e: BaseException) -> int | None:
  """The OS error number behind `e` (TensorStore writes it as os_error_code='N')."""
  for x in _chain(e):
    if isinstance(x, OSError) and x.errno:
      return x.errno
    if m := re.search(r"os_error_code='(\d+)'", str(x)):
      return int(m.group(1))
  return None


def remedy(e: BaseException) -> str:
  """What to do about a failed write, from its OS error."""
  code = _errno(e)
  if code in _NOT_WRITABLE:
    return "the workdir is not writable: fix its permissions or pass another --workdir"
  if code in _FULL:
    return "the disk is full: free disk space, then run the same command to resume"
  if code == errno.EFBIG:
    return ("a file is larger than the file system or `ulimit -f` allows: raise the limit or "
            "pass another --workdir")
  return "free disk space or fix permissions, then run the same command to resume"


@contextlib.contextmanager
def quiet_orbax() -> Iterator[None]:
  """Holds back Orbax's warnings and errors, asyncio's records and unraisable
  exceptions while an Orbax call runs: let through afterwards when it
  succeeds, dropped when it fails (the caller's one line says what failed)."""
  held: list[logging.LogRecord] = []
  unraisable: list[Any] = []

  def hold(record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING and (
        record.name == "asyncio" or record.pathname.startswith(_ORBAX_DIR)):
      held.append(record)
      return False
    return True

  loggers = [logging.getLogger(n) for n in ("absl", "asyncio")]  # Orbax logs through absl.
  hook = sys.unraisablehook
  for logger in loggers:
    logger.addFilter(hold)
  sys.unraisablehook = unraisable.append
  failed = True
  try:
    yield
    failed = False
  finally:
    for logger in loggers:
      logger.removeFilter(hold)
    sys.unraisablehook = hook
    if failed:
      _drop_late_echoes()
    else:
      for record in held:
        logging.getLogger(record.name).handle(record)
      for args in unraisable:
        hook(args)


_ECHO_FILTERS: list[Any] = []  # Installed once, after the first failed Orbax call.


def _is_echo(exc: BaseException | None, tb) -> bool:
  """An exception of Orbax's abandoned work: a TensorStore callback into a
  closed event loop, or an Orbax coroutine finalised with its error."""
  if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
    return True
  while tb is not None:
    if tb.tb_frame.f_code.co_filename.startswith(_ORBAX_DIR):
      return True
    tb = tb.tb_next
  return False


def _drop_late_echoes() -> None:
  """After a failed Orbax call, drops what its still-running background
  work reports later (each one more traceback of the same failure): the
  unraisable exceptions of `_is_echo`, asyncio's "exception was never
  retrieved" records of Orbax tasks and the warning for its read coroutine."""
  if _ECHO_FILTERS:
    return
  previous = sys.unraisablehook

  def hook(args) -> None:
    if not _is_echo(args.exc_value, args.exc_traceback):
      previous(args)

  def not_an_echo(record: logging.LogRecord) -> bool:
    if "never retrieved" not in record.getMessage():
      return True
    # The future's text may name only TensorStore; its traceback names Orbax.
    exc, tb = record.exc_info[1:] if record.exc_info else (None, None)
    return not ("orbax" in record.getMessage() or "TensorStore" in record.getMessage()
                or _is_echo(exc, tb))

  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(not_an_echo)
  # The coroutine of an abandoned array read, collected later.
  warnings.filterwarnings("ignore", message="coroutine '_read_array_index_and_device_put' was "
                          "never awaited", category=RuntimeWarning)
  _ECHO_FILTERS.extend([hook, not_an_echo])
