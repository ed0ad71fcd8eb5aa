"""Process set-up shared by the command lines: quiet start-up, logging, progress.

Each command calls `quiet_startup()` first, parses its arguments, then calls
`setup_logging(verbosity)` and only then imports JAX, TensorFlow or TFDS, so
`--help` answers at once and a run's log holds only what the project says:

  * the project's own information at INFO, as plain lines; warnings and
    errors as "warning: ..." and "error: ...";
  * other libraries (Orbax, TFDS, JAX, TensorFlow) from WARNING up, unless
    the verbosity is raised (`--verbosity=1` / `-v`: their INFO too, and the
    project's DEBUG; 2: everything);
  * on a terminal, tqdm bars; elsewhere (a log file, a pipe) one line every
    `PROGRESS_SECONDS`: done/total, loss, rate and ETA.

Nothing here imports a heavy module.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from typing import Iterable, Iterator, TextIO, TypeVar

PROGRESS_SECONDS = 30.0  # Between two progress lines in a log file.
_OWN = ("midog_jax", "tfds_midogpp", "configs", "__main__")

T = TypeVar("T")


def stderr_is_tty() -> bool:
  try:
    return sys.stderr.isatty()
  except (AttributeError, ValueError):  # Replaced or closed stream.
    return False


def quiet_startup() -> None:
  """Silences TensorFlow's start-up lines; call before TensorFlow is imported.

  Variables already set by the user win.
  """
  # TensorFlow's C++ INFO and WARNING lines (cpu_feature_guard, ...).
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  # The oneDNN notice ignores TF_CPP_MIN_LOG_LEVEL and comes with absl's
  # "before absl::InitializeLog" line. TensorFlow only reads records and
  # writes event files here, never computes with oneDNN's kernels, so turning
  # them off changes no result.
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  if not stderr_is_tty():
    # tqdm bars of other libraries (TFDS, the dataset index) turn into
    # carriage-return junk in a file. Read when tqdm is imported, so too late
    # for a bar created earlier; explicit `disable=` arguments still win.
    os.environ.setdefault("TQDM_DISABLE", "1")


class _StderrHandler(logging.StreamHandler):
  """A handler writing to whatever `sys.stderr` is at the time (tests swap it)."""

  def __init__(self):
    super().__init__(sys.stderr)

  @property
  def stream(self) -> TextIO:
    return sys.stderr

  @stream.setter
  def stream(self, value) -> None:
    del value


class _Formatter(logging.Formatter):
  """INFO as the bare message, the rest with its level; names when verbose."""

  def __init__(self, verbose: bool):
    super().__init__()
    self.verbose = verbose

  def format(self, record: logging.LogRecord) -> str:
    text = super().format(record)
    if self.verbose:
      return f"{record.levelname.lower()} {record.name}: {text}"
    if record.levelno == logging.INFO:
      return text
    return f"{record.levelname.lower()}: {text}"


_PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OWN_DIRS = tuple(os.path.join(_PROJECT, d) + os.sep
                  for d in ("midog_jax", "tfds_midogpp", "configs", "benchmarks", "tests"))


def _is_own(record: logging.LogRecord) -> bool:
  """The project's modules log to the root logger; so do some libraries."""
  if record.name == "root":
    return record.pathname.startswith(_OWN_DIRS)
  return record.name.split(".")[0] in _OWN


# Third-party log lines that are expected and tell the user nothing: shown
# only at verbosity 2. (message template or its start, a part of the file's path)
_DEMOTED = (
    # TFDS checks a dataset folder before building it; not built yet is the
    # reason for the build, not a problem.
    ("Variant folder %s has no %s", "file_utils.py"),
    # Apache Beam, imported by TFDS's builder, without its optional BigQuery client.
    ("apitools not found, and bigquery client libraries", "apache_beam"),
    # Beam reads sys.argv for options of its own; ours are not for it.
    ("Discarding unparseable args", "apache_beam"),
    ("Unparseable argument: ", "apache_beam"),
    # TFDS's banner for Beam datasets built without a runner: ours is small and local.
    ("**************************** WARNING", "split_builder.py"),
)


def _demoted(record: logging.LogRecord) -> bool:
  msg = record.msg if isinstance(record.msg, str) else ""
  return any(msg.lstrip().startswith(m) and part in record.pathname
             for m, part in _DEMOTED)


class HideDemoted(logging.Filter):
  """Drops the expected notices of `_DEMOTED`, for a process whose logging
  this module does not set up (the `tfds build` command)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not _demoted(record)


class _LevelFilter(logging.Filter):
  """The project's records from `own`, the others from `other`."""

  def __init__(self, own: int, other: int):
    super().__init__()
    self.own, self.other = own, other

  def filter(self, record: logging.LogRecord) -> bool:
    if _demoted(record):
      return self.other <= logging.DEBUG
    if _is_own(record):
      return record.levelno >= self.own
    return record.levelno >= self.other


def levels(verbosity: int) -> tuple[int, int]:
  """(project level, third-party level) for absl's verbosity numbers."""
  if verbosity < 0:  # -1: warnings only, -2: errors only (absl's scale).
    level = logging.WARNING if verbosity == -1 else logging.ERROR
    return level, level
  if verbosity == 0:
    return logging.INFO, logging.WARNING
  if verbosity == 1:
    return logging.DEBUG, logging.INFO
  return logging.DEBUG, logging.DEBUG


def setup_logging(verbosity: int = 0) -> None:
  """Routes every log record through one stderr handler; idempotent."""
  own, other = levels(verbosity)
  root = logging.getLogger()
  for h in list(root.handlers):
    if isinstance(h, _StderrHandler):
      root.removeHandler(h)
  if "absl.logging" in sys.modules:  # `app.run` installs absl's handler, with its prefixes.
    from absl import logging as absl_logging
    root.removeHandler(absl_logging.get_absl_handler())
    absl_logging.get_absl_logger().setLevel(logging.NOTSET)  # Our filter decides.
  handler = _StderrHandler()
  handler.setFormatter(_Formatter(verbose=verbosity > 0))
  handler.addFilter(_LevelFilter(own, other))
  root.addHandler(handler)
  root.setLevel(min(own, other))
  # TensorFlow adds a handler of its own unless its logger has one.
  logging.getLogger("tensorflow").setLevel(max(other, logging.ERROR if verbosity <= 0 else other))


@contextlib.contextmanager
def logging_to_stderr(verbosity: int = 0) -> Iterator[None]:
  """`setup_logging` for the length of a command, then the logging set-up of before
  (a command's `main` called in-process, e.g. by a test, leaves no handler behind)."""
  root, tf_logger = logging.getLogger(), logging.getLogger("tensorflow")
  saved = list(root.handlers), root.level, tf_logger.level
  absl = sys.modules.get("absl.logging")
  absl_level = absl.get_absl_logger().level if absl else None
  setup_logging(verbosity)
  try:
    yield
  finally:
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    tf_logger.setLevel(saved[2])
    if absl_level is not None:
      absl.get_absl_logger().setLevel(absl_level)


class Interrupt:
  """Which signal stopped a command: `signum` (None while none came)."""
  signum: int | None = None


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[Interrupt]:
  """SIGTERM (a scheduler's stop) raises KeyboardInterrupt, as Ctrl-C does.

  Only the main thread can set handlers; elsewhere this does nothing. A
  training loop sets its own handlers meanwhile (it saves, then stops).
  """
  caught = Interrupt()
  if threading.current_thread() is not threading.main_thread():
    yield caught
    return

  def handler(signum, frame):
    del frame
    caught.signum = signum
    raise KeyboardInterrupt

  previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield caught
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def format_duration(seconds: float) -> str:
  """"1:02:03", "4:05" (minutes:seconds)."""
  seconds = max(0, int(round(seconds)))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
  """Progress of a loop: a tqdm bar on a terminal, else a line now and then.

  Off a terminal a line such as
    "fold0: 120/960 step, loss 0.4123, 3.1 step/s, ETA 4:31"
  is written every `interval` seconds, and a last one at `close()`. The rate
  counts from the first update, so a first step that compiles does not skew
  the ETA.
  """

  def __init__(self, total: int | None, desc: str, unit: str = "step", initial: int = 0,
               enabled: bool = True, interval: float = PROGRESS_SECONDS,
               stream: TextIO | None = None, tty: bool | None = None, clock=time.monotonic):
    self.total, self.desc, self.unit, self.n = total, desc, unit, initial
    self.enabled, self.interval, self.clock = enabled, interval, clock
    self._stream = stream
    self._postfix = ""
    self._bar = None
    self._start = clock()
    self._first: tuple[float, int] | None = None  # (time, n) at the first update.
    self._printed = self._start
    self._closed = False
    tty = stderr_is_tty() if tty is None else tty
    if enabled and tty:
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                       file=self.stream, disable=False)

  @property
  def stream(self) -> TextIO:
    return self._stream or sys.stderr

  def update(self, n: int = 1) -> None:
    now = self.clock()
    self.n += n
    if self._first is None:
      self._first = (now, self.n)
    if self._bar is not None:
      self._bar.update(n)
    elif (self.enabled and now - self._printed >= self.interval
          and (self.total is None or self.n < self.total)):  # `close()` writes the last.
      self._line(now)

  def set_postfix(self, text: str) -> None:
    """E.g. "loss 0.4123": shown after the count."""
    self._postfix = text
    if self._bar is not None:
      self._bar.set_postfix_str(text.replace(" ", "="), refresh=False)

  def write(self, text: str) -> None:
    """A line of its own (e.g. an epoch's summary) that the bar does not overwrite."""
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(text, file=self.stream)
    else:
      print(text, file=self.stream, flush=True)

  def rate(self, now: float | None = None) -> float | None:
    if self._first is None:
      return None
    now = self.clock() if now is None else now
    t0, n0 = self._first
    return (self.n - n0) / (now - t0) if now > t0 and self.n > n0 else None

  def line(self, now: float | None = None, done: bool = False) -> str:
    """The one-line report: count, postfix, rate and ETA (or time taken)."""
    now = self.clock() if now is None else now
    count = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
    parts = [f"{self.desc}: {count} {self.unit}"]
    if self._postfix:
      parts.append(self._postfix)
    rate = self.rate(now)
    if rate is not None:
      parts.append(f"{rate:.3g} {self.unit}/s")
    if done:
      parts.append(f"took {format_duration(now - self._start)}")
    elif rate and self.total is not None:
      parts.append(f"ETA {format_duration((self.total - self.n) / rate)}")
    return ", ".join(parts)

  def _line(self, now: float, done: bool = False) -> None:
    self._printed = now
    print(self.line(now, done), file=self.stream, flush=True)

  def close(self) -> None:
    if self._closed:
      return
    self._closed = True
    if self._bar is not None:
      self._bar.close()
    elif self.enabled and self._first is not None:
      self._line(self.clock(), done=True)

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def progress(items: Iterable[T], total: int | None, desc: str, unit: str = "item",
             **kwargs) -> Iterator[T]:
  """Yields `items`, reporting progress as `Progress` does."""
  with Progress(total, desc, unit, **kwargs) as p:
    for item in items:
      yield item
      p.update(1)


def first_of(names, n: int = 5) -> str:
  """"a, b, c", or "a, b, c, d, e (first 5 of 9)" when there are more than `n`."""
  names = [str(x) for x in names]
  shown = ", ".join(names[:n])
  return shown if len(names) <= n else f"{shown} (first {n} of {len(names)})"
