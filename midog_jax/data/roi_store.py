"""Decoded ROIs: in host RAM under a byte budget, or on disk memory-mapped.

`RoiCache` keeps decoded ROIs in RAM, least recently used out; budget 0
streams (every patch decodes its ROI again). `DecodedStore` decodes each
PNG once per dataset to a raw file that every later run maps. `StainStore`
keeps each case's stain statistics (`stain.case_statistics`) beside them,
computed once per dataset.

A full-size ROI takes about 0.7 s to decode and 117 MB of RAM. A host that
cannot keep a run's ROIs in RAM would otherwise decode them again for every
window of patches, epoch and run. Here each ROI is decoded once into a raw
uint8 file beside the dataset; every run and epoch after that (and runs
side by side) map the file and read only the rows a crop touches, through
the operating system's page cache.

Files are written to a temporary name and renamed, so a killed decode
leaves nothing half-written, and two processes decoding the same ROI at
once both leave the same complete file. The dataset folder is replaced as a
whole when `tfds build` makes it again, so a record's (shard, offset) names
its pixels for the life of the files.

Each raw file has a sidecar `<file>.crc32c` (its CRC-32C and size, JSON),
written after the file, so a kill in between leaves a file without one. A
process checks each file against its sidecar on first use (about 10 ms
for a full-size ROI in the page cache, benchmarks/README.md); a file that
fails, or has no sidecar (a kill, or a store of an earlier version), is
decoded again and replaced, so no run uses a file damaged before it began.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import os
import shutil
import threading
from typing import Callable, Sequence

import google_crc32c
import numpy as np

from midog_jax import atomic
from midog_jax.data import stain as stain_lib

FOLDER = "midog_jax-decoded"
MODES = ("auto", "ram", "disk")
CHECKSUM = ".crc32c"  # The sidecar's suffix.


class DecodedStore:
  """Maps `case -> uint8 [H, W, 3]` read-only arrays backed by raw files.

  Args:
    decode: case -> decoded ROI (e.g. `dataset.RoiReader`).
    folder: where the raw files live (a local file system).
  """

  def __init__(self, decode: Callable, folder: str | os.PathLike[str]):
    self._decode = decode
    self.folder = os.fspath(folder)
    if "://" in self.folder:
      raise ValueError(f"{self.folder}: decoded ROIs need a local folder to map; set "
                       "decoded_dir to a local disk")
    os.makedirs(self.folder, exist_ok=True)
    self.decodes = 0
    self._verified: set[str] = set()  # Files checked against their sidecar by this process.
    self._told_unchecked = False

  def path(self, case) -> str:
    return os.path.join(self.folder, case_key(case) + ".rgb")

  def __call__(self, case) -> np.ndarray:
    path = self.path(case)
    shape = (case.height, case.width, 3)
    if path not in self._verified:
      if not self._intact(path, shape):
        self._write(path, case, shape)
      self._verified.add(path)
    return np.memmap(path, np.uint8, "r", shape=shape)

  def _intact(self, path: str, shape: tuple[int, int, int]) -> bool:
    """Whether `path` holds `shape`'s bytes and matches its sidecar (logs why not)."""
    if not os.path.exists(path):
      return False  # Not decoded yet.
    size = os.path.getsize(path)
    if size != int(np.prod(shape)):
      logging.warning("%s: %d bytes, expected %d; decoding it again.", path, size,
                      int(np.prod(shape)))
      return False
    try:
      want = atomic.read_json(path + CHECKSUM)
      want = (int(want["crc32c"]), int(want["bytes"]))
    except FileNotFoundError:  # A kill before the sidecar, or an earlier version's store.
      # Said once per process: a store of an earlier version lacks every sidecar.
      logging.log(logging.DEBUG if self._told_unchecked else logging.INFO,
                  "%s has no checksum (a store of an earlier version, or a decode cut "
                  "short); decoding it again, and any other such file.", path)
      self._told_unchecked = True
      return False
    except (ValueError, KeyError, TypeError) as e:
      logging.warning("%s: unreadable checksum (%s); decoding it again.", path + CHECKSUM, e)
      return False
    if want != (_crc32c(np.memmap(path, np.uint8, "r")), size):
      logging.warning("%s is damaged (its CRC-32C does not match %s); decoding it again.",
                      path, os.path.basename(path) + CHECKSUM)
      return False
    return True

  def _write(self, path: str, case, shape: tuple[int, int, int]) -> None:
    image = np.ascontiguousarray(self._decode(case))
    if image.shape != shape or image.dtype != np.uint8:
      raise ValueError(f"{case.file_name}: decoded {image.dtype} {image.shape}, the index "
                       f"says {shape}")
    sidecar = path + CHECKSUM
    with contextlib.suppress(FileNotFoundError):  # Gone first: a kill leaves no stale one.
      os.remove(sidecar)
    atomic.write_bytes(path, memoryview(image).cast("B"))
    atomic.write_json(sidecar, {"crc32c": _crc32c(image), "bytes": image.nbytes}, indent=None)
    self.decodes += 1


def _crc32c(array: np.ndarray) -> int:
  """CRC-32C of an array's bytes (a NumPy array is passed without a copy)."""
  return google_crc32c.value(np.ascontiguousarray(array).reshape(-1))


def decoded_bytes(cases: Sequence) -> int:
  return sum(c.width * c.height * 3 for c in cases)


def _existing_parent(path: str) -> str:
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  return path


def choose(mode: str, cases: Sequence, cache_bytes: int, folder: str) -> str:
  """"ram" or "disk" for `mode`.

  "auto" is "disk" wherever it can be (a local, writable folder with room
  for the cases' decoded ROIs): decoding is then paid once per dataset, not
  once per run, and runs side by side share the page cache. Otherwise
  "ram", the ROIs decoded by each run into `cache_bytes` of host RAM.
  """
  if mode not in MODES:
    raise ValueError(f"roi_store {mode!r}: expected one of {', '.join(MODES)}")
  if mode != "auto":
    return mode
  folder = os.fspath(folder)
  if "://" in folder:
    return "ram"
  parent = _existing_parent(os.path.abspath(folder))
  present = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
                ) if os.path.isdir(folder) else 0
  need = decoded_bytes(cases) - present + (1 << 30)
  if not os.access(parent, os.W_OK) or shutil.disk_usage(parent).free < need:
    logging.info("Decoded ROIs kept in RAM (cache_bytes %.1f GB): %s is not writable or "
                 "lacks %.1f GB free.", cache_bytes / 2**30, parent, need / 2**30)
    return "ram"
  return "disk"


class RoiCache:
  """Decoded ROIs in host RAM under a byte budget, least recently used out.

  `loader(case_id)` decodes one ROI (uint8 [H, W, 3]). An ROI larger than
  the whole budget is returned without being kept, so budget 0 streams.
  Returned ROIs are read-only. Safe to share between threads: threads
  missing on a case another thread is decoding wait for that decode.
  """

  def __init__(self, loader: Callable[[int], np.ndarray], budget_bytes: int):
    if budget_bytes < 0:
      raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
    self._loader = loader
    self.budget_bytes = int(budget_bytes)
    self._images: collections.OrderedDict[int, np.ndarray] = (
        collections.OrderedDict())
    self._nbytes = 0
    self._lock = threading.Lock()
    self._loading: dict[int, concurrent.futures.Future] = {}
    self.hits = 0
    self.loads = 0
    self.evictions = 0

  @property
  def nbytes(self) -> int:
    return self._nbytes

  def __len__(self) -> int:
    return len(self._images)

  def __contains__(self, case_id: int) -> bool:
    return case_id in self._images

  def get(self, case_id: int) -> np.ndarray:
    with self._lock:
      image = self._images.get(case_id)
      if image is not None:
        self._images.move_to_end(case_id)
        self.hits += 1
        return image
      loading = self._loading.get(case_id)
      owner = loading is None
      if owner:
        loading = self._loading[case_id] = concurrent.futures.Future()
      else:
        self.hits += 1
    if not owner:  # Another thread decodes it: share its result.
      return loading.result()
    # Decode outside the lock so other threads keep hitting the cache.
    try:
      image = np.asarray(self._loader(case_id))
      if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"case {case_id}: loader returned {image.dtype} "
                         f"{image.shape}, expected uint8 [H, W, 3]")
    except BaseException as e:
      with self._lock:
        del self._loading[case_id]
      loading.set_exception(e)
      raise
    image.setflags(write=False)  # Shared between threads (and kept): keep it intact.
    with self._lock:
      del self._loading[case_id]
      self.loads += 1
      if image.nbytes <= self.budget_bytes and case_id not in self._images:
        while self._nbytes + image.nbytes > self.budget_bytes:
          _, old = self._images.popitem(last=False)
          self._nbytes -= old.nbytes
          self.evictions += 1
        self._images[case_id] = image
        self._nbytes += image.nbytes
    loading.set_result(image)
    return image

  def clear(self) -> None:
    with self._lock:
      self._images.clear()
      self._nbytes = 0


def case_key(case) -> str:
  """A case's name in the stores: file, record location and size."""
  shard = os.path.basename(case.record.shard)
  return f"{case.file_name}.{shard}.{case.record.offset}.{case.width}x{case.height}"


class StainStore:
  """Each case's `stain.case_statistics`, as `<case>.stain.json` in `folder`.

  Computed from the decoded ROI on first use and kept; a file of another
  version, or a damaged one, is computed again. Where `folder` cannot be
  written the statistics live for this process only.
  """

  def __init__(self, folder: str | os.PathLike[str]):
    self.folder = os.fspath(folder)
    self.computed = 0
    self._memory: dict[str, dict] = {}
    self._told_read_only = False

  def path(self, case) -> str:
    return os.path.join(self.folder, case_key(case) + ".stain.json")

  def get(self, case, load: Callable[[], np.ndarray]) -> dict:
    """The statistics of `case`; `load()` decodes its ROI when they are unknown."""
    path = self.path(case)
    if path in self._memory:
      return self._memory[path]
    with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError):
      found = atomic.read_json(path)
      if found.get("version") == stain_lib.VERSION:
        self._memory[path] = found
        return found
    found = stain_lib.case_statistics(load())
    self.computed += 1
    self._memory[path] = found
    try:
      os.makedirs(self.folder, exist_ok=True)
      atomic.write_json(path, found, indent=None)
    except OSError as e:  # A read-only dataset: computed again by the next run.
      if not self._told_read_only:
        logging.info("Stain statistics kept in memory only: %s (%s).", self.folder, e)
        self._told_read_only = True
    return found
