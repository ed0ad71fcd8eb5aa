"""The one-line reasons and the late echoes of failed Orbax calls."""

import logging
import os
import sys

from midog_jax.training import orbax_errors


def _exc_info_from(filename: str):
  """An exception whose traceback runs through `filename`."""
  code = compile("raise ValueError('OUT_OF_RANGE: byte range not valid')", filename, "exec")
  try:
    exec(code, {})
  except ValueError:
    return sys.exc_info()


def _passes(filters, record) -> bool:
  return all(f(record) if callable(f) else f.filter(record) for f in filters)


def test_a_never_retrieved_record_of_orbax_work_is_dropped_after_a_failure():
  orbax_errors._drop_late_echoes()
  asyncio_filters = logging.getLogger("asyncio").filters
  # asyncio's message names the future only; its traceback runs through Orbax.
  message = ("_GatheringFuture exception was never retrieved\nfuture: <_GatheringFuture "
             "finished exception=Exception('Encountered error while reading array index')>")
  echo = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, None,
                           _exc_info_from(os.path.join(orbax_errors._ORBAX_DIR, "serial.py")))
  other = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, None,
                            _exc_info_from("/elsewhere/app.py"))
  assert not _passes(asyncio_filters, echo)
  assert _passes(asyncio_filters, other)


def test_reason_keeps_the_innermost_cause_on_one_line():
  try:
    try:
      raise ValueError("OUT_OF_RANGE: Requested byte range [5, 9) is not valid\nfor value")
    except ValueError as inner:
      raise Exception("Encountered error while reading. See full TensorStore details: {...}") from inner
  except Exception as e:
    assert orbax_errors.reason(e) == ("ValueError: OUT_OF_RANGE: Requested byte range [5, 9) "
                                      "is not valid for value")
