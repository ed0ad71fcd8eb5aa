"""`tfds build midogpp` downloading its images from a local mirror with faults."""

import collections
import http.server
import logging
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest
import tensorflow_datasets as tfds

from midog_jax.data import annotations
from midog_jax.data import roi_io
from midog_jax.data import synthetic
from tests.helpers import REAL, env_without_accelerators
from tfds_midogpp.midogpp import midogpp_dataset_builder as builder_lib
from tfds_midogpp.midogpp import sources

tfds.core.utils.gcs_utils._is_gcs_disabled = True  # No network here.


class Mirror(http.server.ThreadingHTTPServer):
  """Serves files on 127.0.0.1 and misbehaves as told, per path and request.

  `faults[path]` is a list consumed one per request: "503", "cut" (the
  connection closes mid-file), "short" (a smaller Content-Length: a complete
  but truncated answer) or "stall" (half the file, then silence).
  """
  daemon_threads = True

  def __init__(self, files: dict[str, bytes]):
    super().__init__(("127.0.0.1", 0), _Handler)
    self.files = files
    self.faults = collections.defaultdict(list)
    self.requests = collections.Counter()
    self.lock = threading.Lock()
    threading.Thread(target=self.serve_forever, daemon=True).start()

  @property
  def url(self) -> str:
    return f"http://127.0.0.1:{self.server_address[1]}/"


class _Handler(http.server.BaseHTTPRequestHandler):
  def log_message(self, *args):  # Quiet.
    pass

  def do_GET(self):  # pylint: disable=invalid-name
    server: Mirror = self.server
    path = urllib.parse.unquote(self.path.lstrip("/"))
    with server.lock:
      server.requests[path] += 1
      fault = server.faults[path].pop(0) if server.faults[path] else None
    data = server.files.get(path)
    if data is None or fault == "503":
      self.send_response(404 if data is None else 503)
      self.send_header("Content-Length", "0")
      self.end_headers()
      return
    length = len(data) - 1000 if fault == "short" else len(data)
    self.send_response(200)
    self.send_header("Content-Type", "application/octet-stream")
    self.send_header("Content-Length", str(length))
    self.end_headers()
    if fault in ("cut", "stall"):
      self.wfile.write(data[:len(data) // 2])
      self.wfile.flush()
      if fault == "stall":
        time.sleep(4)  # Longer than the read timeout the tests set.
      self.connection.shutdown(socket.SHUT_RDWR)
      self.close_connection = True
      return
    self.wfile.write(data[:length])


@pytest.fixture()
def mirror(tmp_path, monkeypatch):
  """A mirror of a 10-case synthetic MIDOG++'s images, at their figshare ids,
  and a manual folder holding only the two annotation files."""
  src = tmp_path / "src"
  synthetic.write_dataset(str(src), 1, 96, 72, seed=3, progress=False)
  ids = sources.figshare_ids()
  files = {f"files/{ids[p.name]}": p.read_bytes() for p in (src / "images").iterdir()}
  server = Mirror(files)
  manual = tmp_path / "manual"
  manual.mkdir()
  for name in (builder_lib.ANNOTATIONS_FILE, builder_lib.SPLITS_FILE):
    shutil.copy(src / name, manual / name)
  monkeypatch.setenv(sources.IMAGES_URL_ENV, server.url + "files/")
  monkeypatch.setenv(sources.READ_TIMEOUT_ENV, "1")
  monkeypatch.setenv(sources.BACKOFF_ENV, "0.05")
  monkeypatch.setenv(sources.ATTEMPTS_ENV, "3")
  yield server, src, manual
  server.shutdown()


def _path(name: str) -> str:
  return f"files/{sources.figshare_ids()[name]}"


def _build(manual, data_dir, config=None):
  builder = builder_lib.Builder(data_dir=str(data_dir), config=config)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  return builder


def _check_examples(data_dir, src, config="full", expected=None):
  """Every built image equals its source TIFF; returns the built file names."""
  seen = set()
  builder = tfds.builder_from_directory(
      str(next(pathlib.Path(data_dir, "midogpp", config).iterdir())))
  for split in builder.info.splits:
    for ex in tfds.as_numpy(builder.as_dataset(split)):
      name = ex["file_name"].decode()
      assert (ex["image"] == roi_io.read_roi(src / "images" / name)).all(), name
      seen.add(name)
  if expected is not None:
    assert seen == set(expected)
  return seen


def _cached_files(data_dir):
  """Files TFDS moved into its download cache (not its temporary folders)."""
  root = pathlib.Path(data_dir) / "downloads"
  return [p for p in root.rglob("*") if p.is_file() and ".tmp." not in str(p)
          and not p.name.endswith(".INFO")]


def test_tfds_build_downloads_and_recovers_from_faults(mirror, tmp_path):
  server, src, manual = mirror
  faults = {"001.tiff": ["cut"], "002.tiff": ["503", "503"], "003.tiff": ["short"],
            "004.tiff": ["stall"]}
  for name, fs in faults.items():
    server.faults[_path(name)] = list(fs)
  tfds_cli = pathlib.Path(sys.executable).parent / "tfds"
  env = {**env_without_accelerators(), **{k: os.environ[k] for k in (
      sources.IMAGES_URL_ENV, sources.READ_TIMEOUT_ENV, sources.BACKOFF_ENV,
      sources.ATTEMPTS_ENV)}}
  proc = subprocess.run(
      [str(tfds_cli), "build", "midogpp", "--imports", "tfds_midogpp",
       "--manual_dir", str(manual), "--data_dir", str(tmp_path / "data")],
      capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  names = sorted(p.name for p in (src / "images").iterdir())
  _check_examples(tmp_path / "data", src, expected=names)
  for name in names:  # One request per file, plus one per fault.
    assert server.requests[_path(name)] == 1 + len(faults.get(name, [])), name
  for path in _cached_files(tmp_path / "data"):
    assert roi_io.missing_bytes(path) == 0


def test_persistent_fault_stops_naming_the_file_and_rerun_resumes(mirror, tmp_path):
  server, src, manual = mirror
  server.faults[_path("005.tiff")] = ["short"] * 3
  t = time.perf_counter()
  with pytest.raises(sources.DownloadFailed, match=(
      r"^005\.tiff from http://127\.0\.0\.1:\d+/files/\d+: IncompleteDownload: 1000 bytes "
      r"of image data missing \(after 3 attempts\)\. Run the build again to resume")):
    _build(manual, tmp_path / "data")
  assert time.perf_counter() - t < 60
  # No incomplete file was cached; the others are.
  cached = _cached_files(tmp_path / "data")
  assert all(roi_io.missing_bytes(p) == 0 for p in cached)
  assert len(cached) == 9
  before = server.requests.copy()
  _build(manual, tmp_path / "data")  # The mirror is healthy again.
  names = _check_examples(tmp_path / "data", src)
  assert len(names) == 10
  assert server.requests - before == collections.Counter({_path("005.tiff"): 1})


def test_manual_images_win_over_downloads(mirror, tmp_path):
  server, src, manual = mirror
  (manual / "images").mkdir()
  local = ["001.tiff", "006.tiff", "010.tiff"]
  for name in local:
    shutil.copy(src / "images" / name, manual / "images" / name)
  _build(manual, tmp_path / "data")
  _check_examples(tmp_path / "data", src, expected=[p.name for p in (src / "images").iterdir()])
  assert all(server.requests[_path(n)] == 0 for n in local)
  assert sum(server.requests.values()) == 7


def test_tumour_type_subset_downloads_only_its_images(mirror, tmp_path):
  server, src, manual = mirror
  cases = annotations.load_cases(manual / builder_lib.ANNOTATIONS_FILE,
                                 manual / builder_lib.SPLITS_FILE)
  wanted = sorted(c.file_name for c in cases if c.tumor == "canine_lymphoma")
  config = builder_lib.MidogppConfig(name="lymphoma", tumor_types=["canine lymphosarcoma"])
  assert config.tumor_types == ("canine_lymphoma",)  # Any spelling of the registry.
  _build(manual, tmp_path / "data", config)
  _check_examples(tmp_path / "data", src, "lymphoma", expected=wanted)
  assert sorted(server.requests) == sorted(_path(n) for n in wanted)
  # The subset's own folder is a data_dir the project reads.
  from midog_jax.data import dataset  # pylint: disable=g-import-not-at-top
  folder = tmp_path / "data" / "midogpp" / "lymphoma" / "1.1.0"
  cases = dataset.read_cases(str(folder), "train") + dataset.read_cases(str(folder), "test")
  assert sorted(c.file_name for c in cases) == wanted
  assert (dataset.RoiReader(str(folder))(cases[0]) ==
          roi_io.read_roi(src / "images" / cases[0].file_name)).all()


def test_present_only_builds_what_is_there_and_lists_the_rest_once(mirror, tmp_path, caplog):
  server, src, manual = mirror
  for name in ("002.tiff", "003.tiff", "007.tiff"):
    shutil.copy(src / "images" / name, manual / name)
  config = builder_lib.MidogppConfig(name="present", present_only=True)
  with caplog.at_level(logging.WARNING):
    _build(manual, tmp_path / "data", config)
  _check_examples(tmp_path / "data", src, "present",
                  expected=["002.tiff", "003.tiff", "007.tiff"])
  assert not server.requests
  lines = [r.getMessage() for r in caplog.records if "missing" in r.getMessage()]
  assert len(lines) == 1
  assert lines[0].startswith("Building the 3 of 10 cases whose images are in ")
  assert lines[0].endswith("7 missing: 001.tiff, 004.tiff, 005.tiff, 006.tiff, 008.tiff, "
                           "009.tiff, 010.tiff")


def test_mirrored_annotation_files_must_be_the_pinned_ones(tmp_path, monkeypatch):
  if not (REAL / "MIDOG++.json").exists():
    pytest.skip("the real annotation files are not here")
  real = {name: (REAL / name).read_bytes()
          for name in (builder_lib.ANNOTATIONS_FILE, builder_lib.SPLITS_FILE)}
  files = {"repo/databases/MIDOG++.json": real[builder_lib.ANNOTATIONS_FILE],
           "repo/datasets_xvalidation.csv": real[builder_lib.SPLITS_FILE]}
  server = Mirror(files)
  try:
    monkeypatch.setenv(sources.ANNOTATIONS_URL_ENV, server.url + "repo/")
    builder = builder_lib.Builder(data_dir=str(tmp_path / "a"))
    dl = tfds.download.DownloadManager(download_dir=tmp_path / "a" / "dl", dataset_name="midogpp")
    notes, splits = builder._annotation_files(dl, None, "a folder given as --manual_dir")
    assert pathlib.Path(notes).read_bytes() == real[builder_lib.ANNOTATIONS_FILE]
    assert pathlib.Path(splits).read_bytes() == real[builder_lib.SPLITS_FILE]
    server.files["repo/datasets_xvalidation.csv"] = real[builder_lib.SPLITS_FILE][:-10]
    dl = tfds.download.DownloadManager(download_dir=tmp_path / "b" / "dl", dataset_name="midogpp")
    with pytest.raises(ValueError, match="datasets_xvalidation.csv differs from the pinned file"):
      builder._annotation_files(dl, None, "a folder given as --manual_dir")
  finally:
    server.shutdown()


def test_a_mirror_answering_503_fails_within_the_attempts_and_leaves_no_temporaries(
    mirror, tmp_path):
  server, _, manual = mirror
  server.faults[_path("006.tiff")] = ["503"] * 50
  t = time.perf_counter()
  with pytest.raises(sources.DownloadFailed, match=r"^006\.tiff from .*\(after 1 attempt\)"):
    _build(manual, tmp_path / "data")
  assert time.perf_counter() - t < 60
  # MIDOGPP_DOWNLOAD_ATTEMPTS (3 here) bounds TFDS's own retries of 5xx answers.
  assert server.requests[_path("006.tiff")] == 3
  # The failed file leaves no temporary folder. (Transfers of other files still running
  # when the build stops are TFDS's own; they finish or are restarted by the next build.)
  downloads = tmp_path / "data" / "downloads"
  failed_id = _path("006.tiff").rsplit("/", 1)[-1]
  assert not [p for p in downloads.rglob("*") if ".tmp." in p.name and failed_id in p.name]


def test_an_empty_manual_folder_is_named_when_nothing_can_be_fetched(tmp_path, monkeypatch):
  import socket
  with socket.socket() as s:  # Nothing listens there: an unreachable mirror.
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  monkeypatch.setenv(sources.ANNOTATIONS_URL_ENV, f"http://127.0.0.1:{port}/")
  manual = tmp_path / "manual"
  manual.mkdir()
  with pytest.raises(Exception) as e:
    _build(manual, tmp_path / "data")
  assert f"put the files in the manual folder ({manual} (now empty))" in str(e.value)
