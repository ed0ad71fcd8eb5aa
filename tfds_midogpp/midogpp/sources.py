"""Where the builder gets its files: the manual folder first, else downloads.

Downloads go through TFDS's download manager (caching, atomic placement,
checksums.tsv, one progress display). Two things TFDS's downloader does not
do are added around it: a read timeout (a stalled server otherwise blocks
forever) and bounded retries of a transfer that breaks off or arrives
incomplete (TFDS retries only refused connections and 5xx answers). A file
is checked before TFDS moves it into its cache, so an incomplete TIFF is
never cached, and a rerun downloads only what is not complete yet.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import logging
import os
import socket
import time
import urllib.parse

from etils import epath

from midog_jax.data import roi_io

_HERE = epath.Path(__file__).parent
# Pinned in the authors' repository; sizes and sha256 are in checksums.tsv.
DEFAULT_ANNOTATIONS_URL = ("https://raw.githubusercontent.com/DeepMicroscopy/MIDOGpp/"
                           "9f7c2a6b7b171699a320d4259e9b97dbd8453af1/")
DEFAULT_IMAGES_URL = "https://figshare.com/ndownloader/files/"
ANNOTATION_PATHS = {"annotations": "databases/MIDOG%2B%2B.json",
                    "splits": "datasets_xvalidation.csv"}

# Settings, documented in README.md.
IMAGES_URL_ENV = "MIDOGPP_IMAGES_URL"  # <base><figshare file id>
ANNOTATIONS_URL_ENV = "MIDOGPP_ANNOTATIONS_URL"  # <base><ANNOTATION_PATHS>
ATTEMPTS_ENV = "MIDOGPP_DOWNLOAD_ATTEMPTS"
READ_TIMEOUT_ENV = "MIDOGPP_READ_TIMEOUT_S"
BACKOFF_ENV = "MIDOGPP_RETRY_BACKOFF_S"
CONNECT_TIMEOUT_S = 10


def _setting(name: str, default: float) -> float:
  value = os.environ.get(name)
  try:
    return default if value in (None, "") else float(value)
  except ValueError:
    raise ValueError(f"{name}={value!r} is not a number") from None


def _base(env: str, default: str) -> str:
  base = os.environ.get(env) or default
  return base if base.endswith("/") else base + "/"


def annotation_urls() -> dict[str, str]:
  base = _base(ANNOTATIONS_URL_ENV, DEFAULT_ANNOTATIONS_URL)
  return {key: base + path for key, path in ANNOTATION_PATHS.items()}


@functools.cache
def figshare_ids() -> dict[str, int]:
  """{file name: figshare file id} of the 503 images (and the figshare JSON)."""
  with (_HERE / "figshare_files.tsv").open() as f:
    return {row["file_name"]: int(row["figshare_file_id"])
            for row in csv.DictReader(f, delimiter="\t")}


def image_url(file_name: str) -> str:
  ids = figshare_ids()
  if file_name not in ids:
    raise FileNotFoundError(
        f"{file_name} is not one of the MIDOG++ figshare files; put it in the manual "
        "folder instead")
  return _base(IMAGES_URL_ENV, DEFAULT_IMAGES_URL) + str(ids[file_name])


def pinned_checksums() -> dict[str, tuple[int, str]]:
  """{file name: (bytes, sha256)} of checksums.tsv (the canonical files)."""
  out = {}
  for line in (_HERE / "checksums.tsv").read_text().splitlines():
    if line.strip():
      _, size, sha, name = line.split("\t")
      out[name] = (int(size), sha)
  return out


def verify_pinned(path: epath.Path, name: str, url: str) -> None:
  """A file from a mirror must be the pinned one (TFDS checks only the
  canonical addresses in checksums.tsv)."""
  size, sha = pinned_checksums()[name]
  data = epath.Path(path).read_bytes()
  if (len(data), hashlib.sha256(data).hexdigest()) != (size, sha):
    raise ValueError(
        f"{url}: {name} differs from the pinned file ({len(data)} bytes, expected "
        f"{size} with sha256 {sha[:12]}...); fix the mirror or unset {ANNOTATIONS_URL_ENV}")


def check_reachable(url: str, what: str, where: str) -> None:
  """Fails within seconds, not after minutes of retries, when offline.

  Skipped behind a proxy, where a direct connection may fail while the
  download works.
  """
  if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy",
                                      "HTTP_PROXY", "http_proxy")):
    return
  parsed = urllib.parse.urlparse(url)
  port = parsed.port or (443 if parsed.scheme == "https" else 80)
  try:
    socket.create_connection((parsed.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
  except OSError as e:
    raise ConnectionError(
        f"cannot reach {parsed.hostname} to download {what} ({e}); put the files in "
        f"{where} and run the build again") from None


class IncompleteDownload(IOError):
  """A transfer that ended without error but left an unusable file."""


def check_tiff(path: epath.Path) -> None:
  """Raises IncompleteDownload unless `path` is a TIFF whose data all arrived."""
  try:
    missing = roi_io.missing_bytes(os.fspath(path))
  except roi_io.RoiError as e:
    raise IncompleteDownload(str(e).split(": ", 1)[-1]) from None
  if missing:
    raise IncompleteDownload(f"{missing} bytes of image data missing")


def _transient(error: Exception) -> bool:
  """Worth another attempt: a broken, stalled or incomplete transfer.

  Refused connections and 5xx answers were already retried by TFDS's
  downloader (urllib3 `Retry`); once that gives up, trying again would only
  multiply its waits.
  """
  import requests  # pylint: disable=g-import-not-at-top
  from urllib3 import exceptions as urllib3_errors  # pylint: disable=g-import-not-at-top
  if isinstance(error, IncompleteDownload):
    return True
  if isinstance(error, (requests.exceptions.RetryError, requests.exceptions.SSLError)):
    return False
  if isinstance(error, requests.exceptions.ConnectionError):
    cause = error.args[0] if error.args else None
    return not isinstance(cause, urllib3_errors.MaxRetryError) or isinstance(
        getattr(cause, "reason", None), urllib3_errors.ReadTimeoutError)
  return isinstance(error, (requests.exceptions.ChunkedEncodingError,
                            requests.exceptions.Timeout, urllib3_errors.HTTPError))


class DownloadFailed(IOError):
  """One file could not be downloaded; the message says which and what to do."""


def make_resilient(dl_manager, validators: dict[str, callable]) -> None:
  """Adds a read timeout and bounded retries to `dl_manager`'s downloads.

  Args:
    dl_manager: the builder's `tfds.download.DownloadManager`.
    validators: {url: fn(path)} run on each finished transfer before TFDS
      caches it; a raised IncompleteDownload counts as a failed attempt.
  """
  from tensorflow_datasets.core.download import downloader  # pylint: disable=g-import-not-at-top
  attempts = max(1, int(_setting(ATTEMPTS_ENV, 5)))
  backoff = _setting(BACKOFF_ENV, 2.0)
  read_timeout = _setting(READ_TIMEOUT_ENV, 60.0)
  # TFDS retries 5xx answers and refused connections itself (urllib3, 10 times
  # by default, minutes against a mirror answering 503): our attempts bound it.
  downloader.MAX_RETRIES = attempts - 1
  if not getattr(downloader._open_with_requests, "_midogpp_timeout", False):  # pylint: disable=protected-access
    opener = functools.partial(downloader._open_with_requests,  # pylint: disable=protected-access
                               timeout=(CONNECT_TIMEOUT_S, read_timeout))
    opener._midogpp_timeout = True  # pylint: disable=protected-access
    downloader._open_with_requests = opener  # pylint: disable=protected-access

  tfds_downloader = dl_manager._downloader  # pylint: disable=protected-access
  sync_download = getattr(tfds_downloader, "_midogpp_original", None) or \
      tfds_downloader._sync_download  # pylint: disable=protected-access

  def download(url, destination_path, verify=True):
    for attempt in range(1, attempts + 1):
      try:
        result = sync_download(url, destination_path, verify)
        if url in validators:
          validators[url](result.path)
        return result
      except Exception as e:  # pylint: disable=broad-except
        last = not _transient(e) or attempt == attempts
        _clear(destination_path, remove_folder=last)  # A partial file is no use.
        if last:
          raise DownloadFailed(
              f"{_name_of(url, validators)} from {url}: {type(e).__name__}: {e} "
              f"(after {attempt} attempt{'s' * (attempt > 1)}). Run the build again to "
              "resume (finished files are kept), or download the file by hand into the "
              "manual folder (--manual_dir)") from None
        wait = backoff * 2 ** (attempt - 1)
        logging.warning("%s: %s; attempt %d of %d in %.0f s", url, e, attempt + 1,
                        attempts, wait)
        time.sleep(wait)
    raise AssertionError("unreachable")

  tfds_downloader._midogpp_original = sync_download  # pylint: disable=protected-access
  tfds_downloader._sync_download = download  # pylint: disable=protected-access


def _clear(destination_path, remove_folder: bool) -> None:
  """Empties (or removes) the temporary folder TFDS gave a failed transfer."""
  path = epath.Path(destination_path)
  if ".tmp." not in path.name or not path.exists():  # Never the downloads folder itself.
    return
  if remove_folder:
    path.rmtree(missing_ok=True)
    return
  for child in path.iterdir():
    child.rmtree(missing_ok=True) if child.is_dir() else child.unlink(missing_ok=True)


def _name_of(url: str, validators: dict) -> str:
  fn = validators.get(url)
  return getattr(fn, "file_name", None) or url.rsplit("/", 1)[-1]


def tiff_validator(file_name: str):
  fn = functools.partial(check_tiff)
  fn.file_name = file_name
  return fn
