"""`midogpp`: the 503 MIDOG++ regions of interest with their annotations."""

from __future__ import annotations

import io
import os
import socket
import sys
import urllib.parse

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from midog_jax import annotations as annotations_lib
from midog_jax import domains
from midog_jax import roi_io
from midog_jax import tissue

# Pinned in the authors' repository; sizes and sha256 are in checksums.tsv.
_REPO = ("https://raw.githubusercontent.com/DeepMicroscopy/MIDOGpp/"
         "9f7c2a6b7b171699a320d4259e9b97dbd8453af1/")
ANNOTATIONS_URL = _REPO + "databases/MIDOG%2B%2B.json"
SPLITS_URL = _REPO + "datasets_xvalidation.csv"
ANNOTATIONS_FILE = "MIDOG++.json"
SPLITS_FILE = "datasets_xvalidation.csv"
MAX_VOTES = 3  # Two experts, plus a third where they disagreed.
# zlib level 1: 5x faster to encode than the default, 7 % larger, decodes
# as fast (measured on full-size ROIs, see README.md).
PNG_COMPRESSION = 1
CONNECT_TIMEOUT_S = 10


class Builder(tfds.core.GeneratorBasedBuilder):
  """DatasetBuilder for MIDOG++ (Aubreville et al., Scientific Data 2023)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release: 392 train and 111 test cases."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  The 503 MIDOG++ images (001.tiff ... 553.tiff, about 65 GB) are in the
  MIDOG++ figshare collection (reference 34 of the paper; one file per image:
  https://figshare.com/ndownloader/files/<file id>). Put them in `manual_dir`
  (or `manual_dir/images`). `MIDOG++.json` and `datasets_xvalidation.csv`
  are read from `manual_dir` when present, otherwise downloaded from the
  authors' repository at a pinned commit and checked against checksums.tsv.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    vector = tfds.features.Tensor(shape=(3,), dtype=np.float32)
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "file_name": tfds.features.Text(),
            "case_id": np.int32,
            "tumor_type": tfds.features.ClassLabel(names=domains.TUMOR_SLUGS),
            "domain": tfds.features.ClassLabel(names=domains.DOMAIN_IDS),
            "scanner": tfds.features.Text(),
            "lab": tfds.features.Text(),
            "species": tfds.features.Text(),
            "um_per_px": np.float32,
            "objects": tfds.features.Sequence({
                "id": np.int64,
                "bbox": tfds.features.BBoxFeature(),
                "center": tfds.features.Tensor(shape=(2,), dtype=np.float32),
                "label": np.int64,
                "votes": tfds.features.Tensor(shape=(MAX_VOTES,), dtype=np.int64),
            }),
            "tissue": tfds.features.FeaturesDict({
                "mean": vector, "std": vector, "fraction": np.float32}),
        }),
        supervised_keys=None,
        homepage="https://github.com/DeepMicroscopy/MIDOGpp",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual = dl_manager.manual_dir
    images = manual / "images" if (manual / "images").is_dir() else manual
    local = {"annotations": manual / ANNOTATIONS_FILE, "splits": manual / SPLITS_FILE}
    try:
      if not all(p.exists() for p in local.values()):
        _check_reachable(ANNOTATIONS_URL, manual)
        local = dl_manager.download({"annotations": ANNOTATIONS_URL, "splits": SPLITS_URL})
      cases = annotations_lib.load_cases(os.fspath(local["annotations"]),
                                         os.fspath(local["splits"]))
      missing = [c.file_name for c in cases if not (images / c.file_name).exists()]
      if missing:  # All at once, before hours of work, not one by one.
        raise FileNotFoundError(
            f"{len(missing)} of {len(cases)} images are missing in {images}: "
            f"{', '.join(missing)}. Download them from the MIDOG++ figshare collection "
            "into that folder and run the build again.")
    except (ConnectionError, FileNotFoundError, annotations_lib.AnnotationError) as e:
      _stop(e)
    by_split = {s: [c for c in cases if c.split == s] for s in annotations_lib.SPLITS}
    # A partial annotation set (e.g. a subset of cases) may lack a split.
    return {s: self._generate_examples(images, cs) for s, cs in by_split.items() if cs}

  def _generate_examples(self, images, cases):
    for case in cases:
      try:
        ex = example(os.fspath(images / case.file_name), case)
      except roi_io.RoiError as e:
        _stop(e)
      yield case.file_name, ex


def _stop(error: Exception):
  """Raises `error`; under the `tfds` command line, as one line without a
  traceback (SystemExit passes through TFDS and prints only its message)."""
  if os.path.basename(sys.argv[0]) == "tfds":
    raise SystemExit(f"error: {error}") from None
  raise error


def _check_reachable(url: str, manual) -> None:
  """Fails within seconds, not after minutes of retries, when offline."""
  parsed = urllib.parse.urlparse(url)
  port = parsed.port or (443 if parsed.scheme == "https" else 80)
  try:
    socket.create_connection((parsed.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
  except OSError as e:
    raise ConnectionError(
        f"cannot reach {parsed.hostname} to download {ANNOTATIONS_FILE} and {SPLITS_FILE} "
        f"({e}); put both files in the manual folder ({manual}) and run the build again"
    ) from None


def example(path: str, case: annotations_lib.Case) -> dict:
  """One TFDS example from a TIFF and its case record (errors name the file)."""
  rgb = roi_io.read_roi(path, expected_size=(case.width, case.height))
  um_per_px = roi_io.read_um_per_px(path) or case.um_per_px
  domain = domains.domain(case.domain)
  stats = tissue.tissue_stats(rgb)
  half = annotations_lib.BOX_SIZE / 2
  w, h = case.width, case.height
  return {
      "image": io.BytesIO(tf.io.encode_png(rgb, compression=PNG_COMPRESSION).numpy()),
      "file_name": case.file_name,
      "case_id": case.id,
      "tumor_type": case.tumor,
      "domain": case.domain,
      "scanner": domain.scanner.name,
      "lab": domain.lab,
      "species": domain.species,
      "um_per_px": um_per_px,
      "objects": [{
          "id": o.id,
          # Normalised (ymin, xmin, ymax, xmax), clipped: a few boxes stick out.
          "bbox": tfds.features.BBox(
              ymin=max(0.0, (o.y - half) / h), xmin=max(0.0, (o.x - half) / w),
              ymax=min(1.0, (o.y + half) / h), xmax=min(1.0, (o.x + half) / w)),
          "center": np.array([o.x, o.y], np.float32),
          "label": o.label,
          "votes": np.array(list(o.votes) + [0] * (MAX_VOTES - len(o.votes)), np.int64),
      } for o in case.objects],
      "tissue": stats,
  }
