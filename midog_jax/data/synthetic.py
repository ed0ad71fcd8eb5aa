"""A synthetic MIDOG++ in the real formats: TIFFs, `MIDOG++.json`, split CSV.

Written by `python -m midog_jax.synthetic` (and the demo). Images are rendered in optical density (Beer-Lambert) with haematoxylin and
eosin stain vectors, so stain colour varies by scanner and lab as in life.
Mitotic figures are dark, irregular clumps of chromatin; the hard negatives
are dark smooth round nuclei or pale large ones, which a detector must learn
to reject. Nucleus size and density depend on the tumour type, object counts
per case follow the proportions of the paper's Table 2. Same seed, same bytes.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Sequence

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from midog_jax import atomic
from midog_jax import domains
from midog_jax.data import annotations as annotations_lib
from midog_jax.data import roi_io

# Nucleus radius (µm) and mean spacing between nuclei (µm) per tumour type:
# lymphoma small and dense, sarcoma and melanoma larger and sparser.
_MORPHOLOGY = {
    "human_breast_carcinoma": (3.2, 11.0),
    "canine_lung_carcinoma": (3.0, 11.0),
    "canine_lymphoma": (2.2, 7.5),
    "canine_mast_cell_tumor": (2.8, 9.0),
    "human_neuroendocrine_tumor": (2.6, 9.0),
    "canine_soft_tissue_sarcoma": (3.0, 13.0),
    "human_melanoma": (3.4, 12.0),
}
assert set(_MORPHOLOGY) == set(domains.TUMOR_SLUGS)

_HAEMATOXYLIN = np.array([0.65, 0.70, 0.29])  # Ruifrok & Johnston OD vectors.
_EOSIN = np.array([0.07, 0.99, 0.11])
_REAL_ROI_UM2 = 2e6  # Every real ROI spans 2 mm².
_MIN_OBJECT_DISTANCE_PX = 24
_TISSUE_LEVEL = 0.12


def _unit(v: np.ndarray) -> np.ndarray:
  return v / np.linalg.norm(v)


def stain(domain: domains.Domain, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Stain OD vectors of a case: scanner shift, then lab shift, then jitter."""
  h, e = _HAEMATOXYLIN.copy(), _EOSIN.copy()
  for key, scale in ((domain.scanner.slug, 0.1), (domain.lab, 0.06)):
    shift = np.random.default_rng(zlib.crc32(key.encode())).normal(0, scale, (2, 3))
    h, e = np.abs(h + shift[0]), np.abs(e + shift[1])
  h = _unit(np.abs(h + rng.normal(0, 0.03, 3)))
  e = _unit(np.abs(e + rng.normal(0, 0.03, 3)))
  return h, e


def _disc(radius: float, soft: float = 1.0) -> np.ndarray:
  r = int(np.ceil(radius + 2 * soft))
  yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
  return np.clip((radius - np.hypot(xx, yy)) / soft + 0.5, 0, 1)


def _stamp(density: np.ndarray, sprite: np.ndarray, x: float, y: float) -> None:
  """Max-composites `sprite` centred at (x, y) into `density`, clipped."""
  r = sprite.shape[0] // 2
  cx, cy = int(round(x)), int(round(y))
  y0, x0 = cy - r, cx - r
  ys, xs = slice(max(y0, 0), min(y0 + sprite.shape[0], density.shape[0])), \
      slice(max(x0, 0), min(x0 + sprite.shape[1], density.shape[1]))
  if ys.start >= ys.stop or xs.start >= xs.stop:
    return
  sub = sprite[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
  np.maximum(density[ys, xs], sub, out=density[ys, xs])


def nucleus(radius_px: float, rng: np.random.Generator) -> np.ndarray:
  """An interphase nucleus: an ellipse with fine granular chromatin."""
  a = radius_px * rng.uniform(0.85, 1.2)
  b = radius_px * rng.uniform(0.7, 1.0)
  r = int(np.ceil(max(a, b) + 2))
  yy, xx = np.mgrid[-r:r + 1, -r:r + 1].astype(np.float32)
  t = rng.uniform(0, np.pi)
  u, v = xx * np.cos(t) + yy * np.sin(t), -xx * np.sin(t) + yy * np.cos(t)
  inside = np.clip((1 - np.hypot(u / a, v / b)) * max(a, b) + 0.5, 0, 1)
  grain = rng.uniform(0.75, 1.0, inside.shape)
  return (inside * grain * rng.uniform(0.45, 0.7)).astype(np.float32)


def mitotic_figure(radius_px: float, rng: np.random.Generator) -> np.ndarray:
  """Condensed chromosomes: a dark irregular clump of small blobs and spikes."""
  r = int(np.ceil(radius_px * 1.6 + 2))
  out = np.zeros((2 * r + 1, 2 * r + 1), np.float32)
  elongation = rng.uniform(0.4, 1.0)  # Metaphase plates are elongated.
  angle = rng.uniform(0, np.pi)
  for _ in range(rng.integers(7, 13)):
    d = rng.uniform(0, radius_px) * np.array([1.0, elongation])
    t = rng.uniform(0, 2 * np.pi)
    px, py = d[0] * np.cos(t), d[1] * np.sin(t)
    x = r + px * np.cos(angle) - py * np.sin(angle)
    y = r + px * np.sin(angle) + py * np.cos(angle)
    blob = _disc(rng.uniform(0.18, 0.35) * radius_px, soft=0.6) * rng.uniform(1.6, 2.2)
    _stamp(out, blob.astype(np.float32), x, y)
  return out


def imposter(radius_px: float, rng: np.random.Generator) -> np.ndarray:
  """A hard negative: a dark but smooth round nucleus, or a pale large one."""
  if rng.random() < 0.6:
    return (_disc(radius_px * rng.uniform(0.8, 1.0), soft=1.5)
            * rng.uniform(1.3, 1.8)).astype(np.float32)
  return (_disc(radius_px * rng.uniform(1.2, 1.5), soft=2.0)
          * rng.uniform(0.35, 0.5)).astype(np.float32)


def _smooth_noise(shape: tuple[int, int], scale_px: float, rng: np.random.Generator) -> np.ndarray:
  """Low-frequency noise in [0, 1] at full resolution, made at low resolution."""
  small = (max(2, int(shape[0] / scale_px) + 2), max(2, int(shape[1] / scale_px) + 2))
  field = ndimage.gaussian_filter(rng.random(small), 1.0)
  field = ndimage.zoom(field, (shape[0] / small[0], shape[1] / small[1]), order=1)
  field = field[:shape[0], :shape[1]]
  field = np.pad(field, ((0, shape[0] - field.shape[0]), (0, shape[1] - field.shape[1])), mode="edge")
  lo, hi = field.min(), field.max()
  return ((field - lo) / (hi - lo + 1e-9)).astype(np.float32)


def tissue_field(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
  """Smooth field in [0, 1]; tissue where it exceeds `_TISSUE_LEVEL`."""
  return _smooth_noise((height, width), 400, rng)


def render(tissue: np.ndarray, domain: domains.Domain, um_per_px: float,
           objects: Sequence[annotations_lib.MidogObject],
           rng: np.random.Generator) -> np.ndarray:
  """Renders one H&E-like ROI as uint8 RGB with the given objects."""
  height, width = tissue.shape
  radius_um, spacing_um = _MORPHOLOGY[domain.tumor.slug]
  radius = radius_um / um_per_px
  h_vec, e_vec = stain(domain, rng)
  eosin = (0.25 + 0.35 * tissue) * (tissue > _TISSUE_LEVEL)  # A few empty gaps.
  eosin *= rng.uniform(0.8, 1.0, (height, width)).astype(np.float32)
  haem = np.zeros((height, width), np.float32)

  n_nuclei = int(width * height * um_per_px ** 2 / spacing_um ** 2)
  xy = rng.random((n_nuclei, 2)) * [width, height]
  if objects:  # Keep ordinary nuclei off the annotated objects.
    centres = np.array([[o.x, o.y] for o in objects])
    near = np.zeros(len(xy), bool)
    for c in centres:
      near |= np.hypot(*(xy - c).T) < 2.5 * radius
    xy = xy[~near]
  bank = [nucleus(radius, rng) for _ in range(24)]
  for (x, y), k in zip(xy, rng.integers(0, len(bank), len(xy))):
    if eosin[min(int(y), height - 1), min(int(x), width - 1)] > 0:
      _stamp(haem, bank[k], x, y)
  for o in objects:
    sprite = (mitotic_figure if o.is_mitotic else imposter)(radius * 1.2, rng)
    _stamp(haem, sprite, o.x, o.y)

  od = (haem[..., None] * h_vec + eosin[..., None] * e_vec) * rng.uniform(0.9, 1.1)
  rgb = 245.0 * np.exp(-od)
  rgb += rng.normal(0, 2.0, (height, width, 1))  # Sensor noise.
  return np.clip(rgb, 0, 255).astype(np.uint8)


def _count(mean: float, rng: np.random.Generator) -> int:
  # Gamma-Poisson: cases differ in activity (some have no figures at all).
  return int(rng.poisson(mean * rng.gamma(2.0, 0.5)))


def _place(n: int, tissue: np.ndarray, taken: list[tuple[float, float]],
           rng: np.random.Generator) -> list[tuple[float, float]]:
  """Up to n points on tissue, apart from each other and from `taken`."""
  out = []
  height, width = tissue.shape
  margin = annotations_lib.BOX_SIZE / 2
  for _ in range(n * 50):
    if len(out) == n:
      break
    x = rng.uniform(margin, max(margin + 1, width - margin))
    y = rng.uniform(margin, max(margin + 1, height - margin))
    if tissue[min(int(y), height - 1), min(int(x), width - 1)] <= _TISSUE_LEVEL:
      continue
    if all(np.hypot(x - a, y - b) >= _MIN_OBJECT_DISTANCE_PX for a, b in taken + out):
      out.append((x, y))
  return out


def _votes(label: int, rng: np.random.Generator) -> tuple[int, ...]:
  other = annotations_lib.NON_MITOTIC_FIGURE if label == annotations_lib.MITOTIC_FIGURE \
      else annotations_lib.MITOTIC_FIGURE
  if rng.random() < 0.8:
    return (label, label)
  return tuple(rng.permutation([label, other])) + (label,)


def _random_objects(domain, tissue, um_per_px, density_scale, rng):
  height, width = tissue.shape
  area = width * height * um_per_px ** 2 / _REAL_ROI_UM2 * density_scale
  n_mitotic = _count(domain.mitotic_figures / domain.cases * area, rng)
  n_other = _count(domain.non_mitotic_figures / domain.cases * area, rng)
  mitotic = _place(n_mitotic, tissue, [], rng)
  other = _place(n_other, tissue, mitotic, rng)
  labels = [annotations_lib.MITOTIC_FIGURE] * len(mitotic) + \
      [annotations_lib.NON_MITOTIC_FIGURE] * len(other)
  return [(x, y, lab) for (x, y), lab in zip(mitotic + other, labels)]


def _layout_objects(real_case, width, height):
  sx, sy = width / real_case.width, height / real_case.height
  return [(o.x * sx, o.y * sy, o.label, o.votes) for o in real_case.objects]


def write_dataset(out: str, cases_per_domain: int, width: int, height: int,
                  seed: int = 0, layout_from: str | None = None,
                  density_scale: float = 1.0, rgba: bool = True,
                  progress: bool = True) -> list[annotations_lib.Case]:
  """Writes `out/images/*.tiff`, `out/MIDOG++.json`, `out/datasets_xvalidation.csv`."""
  os.makedirs(os.path.join(out, "images"), exist_ok=True)
  real_by_tumor: dict[str, list] = {}
  if layout_from:
    if not os.path.isfile(layout_from):  # Before the CSV beside it is looked for.
      raise annotations_lib.AnnotationError(
          f"{layout_from}: annotation file not found; pass the path of MIDOG++.json")
    splits = os.path.join(os.path.dirname(layout_from), "datasets_xvalidation.csv")
    for c in annotations_lib.load_cases(layout_from, splits):
      real_by_tumor.setdefault(c.tumor, []).append(c)

  cases, case_id, annotation_id = [], 0, 0
  digits = max(3, len(str(cases_per_domain * len(domains.DOMAINS))))
  plan = []
  for d in domains.DOMAINS:
    n_test = max(1, round(0.2 * cases_per_domain)) if cases_per_domain > 1 else 0
    test = set(np.random.default_rng([seed, zlib.crc32(d.id.encode())]).choice(
        cases_per_domain, n_test, replace=False).tolist())
    for k in range(cases_per_domain):
      case_id += 1
      plan.append((case_id, d, k, "test" if k in test else "train"))

  for case_id, d, k, split in tqdm(plan, desc="synthetic ROIs", disable=not progress):
    rng = np.random.default_rng([seed, case_id])
    um = d.um_per_px
    tissue = tissue_field(width, height, rng)
    if layout_from:
      pool = real_by_tumor[d.tumor.slug]
      offset = domains.DOMAINS.index(d) * cases_per_domain
      placed = _layout_objects(pool[(offset + k) % len(pool)], width, height)
    else:
      placed = [(x, y, lab, _votes(lab, rng)) for x, y, lab in
                _random_objects(d, tissue, um, density_scale, rng)]
    objects = []
    for x, y, label, votes in placed:
      annotation_id += 1
      objects.append(annotations_lib.MidogObject(
          annotation_id, float(round(x)), float(round(y)), label, tuple(int(v) for v in votes)))
    file_name = f"{case_id:0{digits}d}.tiff"
    rgb = render(tissue, d, um, objects, rng)
    roi_io.write_roi(os.path.join(out, "images", file_name), rgb, um, rgba=rgba)
    cases.append(annotations_lib.Case(case_id, file_name, width, height, d.tumor.slug,
                                      d.id, split, um, tuple(objects)))
  _write_json(os.path.join(out, "MIDOG++.json"), cases)
  _write_csv(os.path.join(out, "datasets_xvalidation.csv"), cases)
  return cases


def _write_json(path: str, cases: Sequence[annotations_lib.Case]) -> None:
  half = annotations_lib.BOX_SIZE / 2
  data = {
      "info": {"description": "Synthetic MIDOG++ (midog_jax.synthetic)", "version": "1.0"},
      "licenses": [{"id": 1, "name": "CC0"}],
      "images": [{"license": 1, "file_name": c.file_name, "id": c.id, "width": c.width,
                  "height": c.height, "tumor_type": domains.tumor_type(c.tumor).json_name}
                 for c in cases],
      "categories": [{"id": annotations_lib.MITOTIC_FIGURE, "name": "mitotic figure"},
                     {"id": annotations_lib.NON_MITOTIC_FIGURE, "name": "not mitotic figure"}],
      "annotations": [{"bbox": [_int(o.x - half), _int(o.y - half), _int(o.x + half), _int(o.y + half)],
                       "category_id": o.label, "image_id": c.id, "labels": list(o.votes),
                       "id": o.id} for c in cases for o in c.objects],
  }
  atomic.write_text(path, json.dumps(data))


def _int(v: float) -> int | float:
  return int(v) if float(v).is_integer() else float(v)


def _write_csv(path: str, cases: Sequence[annotations_lib.Case]) -> None:
  lines = [";".join(annotations_lib.CSV_COLUMNS)]
  for c in cases:
    d = domains.domain(c.domain)
    lines.append(";".join([str(c.id), c.split, d.tumor.csv_name, d.scanner.csv_name,
                           d.lab, d.species.capitalize()]))
  atomic.write_text(path, "\n".join(lines) + "\n")
