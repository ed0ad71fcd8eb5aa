"""`midogpp`: the 503 MIDOG++ regions of interest with their annotations."""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import sys
import tempfile

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath

from midog_jax import console
from midog_jax import domains
from midog_jax.data import annotations as annotations_lib
from midog_jax.data import normalization
from midog_jax.data import roi_io
from tfds_midogpp.midogpp import sources

ANNOTATIONS_URL = sources.DEFAULT_ANNOTATIONS_URL + sources.ANNOTATION_PATHS["annotations"]
SPLITS_URL = sources.DEFAULT_ANNOTATIONS_URL + sources.ANNOTATION_PATHS["splits"]
ANNOTATIONS_FILE = "MIDOG++.json"
SPLITS_FILE = "datasets_xvalidation.csv"
MAX_VOTES = 3  # Two experts, plus a third where they disagreed.
# zlib level 1: 5x faster to encode than the default, 7 % larger, decodes
# as fast (measured on full-size ROIs, see README.md).
PNG_COMPRESSION = 1




def _under_tfds_command() -> bool:
  return os.path.basename(sys.argv[0]) == "tfds"


if _under_tfds_command():
  # TFDS's notice about the version folder it creates itself, and Beam's
  # expected notices, are not for the user. (The project's own commands
  # hide them through `console.setup_logging`, and show them at verbosity 2.)
  for _logger in (logging.getLogger("absl"), logging.getLogger()):
    _logger.addFilter(console.HideDemoted())


@dataclasses.dataclass(eq=False)
class MidogppConfig(tfds.core.BuilderConfig):
  """Which cases to build.

  Attributes:
    tumor_types: tumour types to keep (any spelling of the registry); empty:
      all seven.
    present_only: build only the cases whose images are in the manual
      folder (the others are listed once), downloading nothing but the two
      annotation files when they are absent.
  """
  tumor_types: tuple[str, ...] = ()
  present_only: bool = False

  def __post_init__(self):
    # From `--config '{"tumor_types": [...]}'` the types arrive as a list.
    self.tumor_types = tuple(domains.tumor_type(t).slug for t in self.tumor_types)

  def select(self, cases):
    if not self.tumor_types:
      return list(cases)
    return [c for c in cases if domains.tumor_type(c.tumor).slug in self.tumor_types]


class Builder(tfds.core.GeneratorBasedBuilder):
  """DatasetBuilder for MIDOG++ (Aubreville et al., Scientific Data 2023)."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release: 392 train and 111 test cases.",
      "1.1.0": "Images downloaded from figshare when not in the manual folder; "
               "builder configs for subsets; built with Apache Beam. Same examples.",
  }
  BUILDER_CONFIG_CLASS = MidogppConfig
  # One predefined config: `tfds build` builds every listed config when none
  # is named. Subsets are custom configs, e.g.
  # --config '{"name": "lymphoma", "tumor_types": ["canine_lymphoma"]}'.
  BUILDER_CONFIGS = [MidogppConfig(name="full", description="All 503 cases.")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Optional. The 503 MIDOG++ images (001.tiff ... 553.tiff, about 65 GB) are
  downloaded from the MIDOG++ figshare collection when absent. Images already
  in `manual_dir` (or `manual_dir/images`) are used instead, and so are
  `MIDOG++.json` and `datasets_xvalidation.csv` there.
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
    config = self.builder_config
    manual = _manual_dir(dl_manager)
    images = manual / "images" if manual and (manual / "images").is_dir() else manual
    given = getattr(dl_manager, "_manual_dir", None)  # TFDS hides an empty or absent one.
    where = (os.fspath(images) if images else
             f"{given} (now empty)" if given else "a folder given as --manual_dir")
    try:
      sources.make_resilient(dl_manager, {})
      notes, splits = self._annotation_files(dl_manager, manual, where)
      cases = config.select(annotations_lib.load_cases(os.fspath(notes), os.fspath(splits)))
      if not cases:
        raise FileNotFoundError(f"no case of tumour types {config.tumor_types} in {notes}")
      paths = {c.file_name: images / c.file_name for c in cases
               if images and (images / c.file_name).exists()}
      missing = [c.file_name for c in cases if c.file_name not in paths]
      if missing and config.present_only:
        if not paths:
          raise FileNotFoundError(f"none of the {len(cases)} images is in {where}")
        # Listed once, here, not per case.
        logging.warning("Building the %d of %d cases whose images are in %s; %d missing: %s",
                        len(paths), len(cases), where, len(missing), ", ".join(missing))
        cases = [c for c in cases if c.file_name in paths]
      elif missing:
        paths.update(_download_images(dl_manager, missing, where))
      for c in cases:  # Headers only: a bad file stops the build before any work.
        if "://" not in os.fspath(paths[c.file_name]):
          roi_io.check_file(os.fspath(paths[c.file_name]), (c.width, c.height))
    except (OSError, ValueError, annotations_lib.AnnotationError) as e:
      _stop(e)
    by_split = {s: [(os.fspath(paths[c.file_name]), c) for c in cases if c.split == s]
                for s in annotations_lib.SPLITS}
    # A partial annotation set (e.g. a subset of cases) may lack a split.
    return {s: self._generate_examples(items) for s, items in by_split.items() if items}

  def _annotation_files(self, dl_manager, manual, where):
    local = {"annotations": manual and manual / ANNOTATIONS_FILE,
             "splits": manual and manual / SPLITS_FILE}
    if all(p and p.exists() for p in local.values()):
      return local["annotations"], local["splits"]
    urls = sources.annotation_urls()
    sources.check_reachable(urls["annotations"], f"{ANNOTATIONS_FILE} and {SPLITS_FILE}",
                            f"the manual folder ({manual or where})")
    paths = dl_manager.download(urls)
    if os.environ.get(sources.ANNOTATIONS_URL_ENV):  # A mirror: not in checksums.tsv.
      sources.verify_pinned(paths["annotations"], ANNOTATIONS_FILE, urls["annotations"])
      sources.verify_pinned(paths["splits"], SPLITS_FILE, urls["splits"])
    return paths["annotations"], paths["splits"]

  def _generate_splits(self, dl_manager, download_config):
    # Beam when asked for (worker processes, a cluster). In one process TFDS's
    # own writer streams the examples to disk, without a pipeline to start.
    self._use_beam = (download_config.beam_runner is not None
                      or download_config.beam_options is not None)
    return super()._generate_splits(dl_manager, download_config)

  def _generate_examples(self, items):
    """One example per (TIFF path, case): a Beam PTransform run in parallel
    when Beam options are given, else a generator."""
    if not getattr(self, "_use_beam", False):
      return (_keyed_example(path, case) for path, case in items)
    beam = tfds.core.lazy_imports.apache_beam
    return beam.Create(items) | "Read TIFF and encode" >> beam.MapTuple(_keyed_example)


def _manual_dir(dl_manager) -> epath.Path | None:
  try:
    return epath.Path(dl_manager.manual_dir)
  except AssertionError:  # Not given, or absent or empty: download everything.
    return None


def _download_images(dl_manager, file_names, where) -> dict[str, epath.Path]:
  urls = {name: sources.image_url(name) for name in file_names}
  logging.info("Downloading %d images from %s", len(urls),
               os.path.dirname(next(iter(urls.values()))))
  shown = ", ".join(list(urls)[:20]) + (f" and {len(urls) - 20} more" if len(urls) > 20 else "")
  sources.check_reachable(next(iter(urls.values())), f"{len(urls)} images ({shown})", where)
  sources.make_resilient(
      dl_manager, {url: sources.tiff_validator(name) for name, url in urls.items()})
  paths = dl_manager.download(urls)  # One progress display for all files.
  return {name: epath.Path(p) for name, p in paths.items()}


def _keyed_example(path, case):
  """(key, example) of one case. No annotations: Beam would log each string one."""
  if "://" not in path:
    return case.file_name, example(path, case)
  # A cluster worker reading a bucket: tifffile needs a local file.
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, case.file_name)
    epath.Path(path).copy(local)
    return case.file_name, example(local, case)


def _stop(error: Exception):
  """Raises `error`; under the `tfds` command line, as one line without a
  traceback (SystemExit passes through TFDS and prints only its message)."""
  if _under_tfds_command():
    raise SystemExit(f"error: {error}") from None
  raise error


def example(path: str, case: annotations_lib.Case) -> dict:
  """One TFDS example from a TIFF and its case record (errors name the file)."""
  rgb = roi_io.read_roi(path, expected_size=(case.width, case.height))
  um_per_px = roi_io.read_um_per_px(path) or case.um_per_px
  domain = domains.domain(case.domain)
  stats = normalization.tissue_stats(rgb)
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
