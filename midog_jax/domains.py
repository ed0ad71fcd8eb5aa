"""The one registry of MIDOG++ tumour types, scanners and domains.

Every tumour, scanner and lab name the data files use is spelled here and
nowhere else; the rest of the code looks things up by slug or domain id.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TumorType:
  slug: str  # Stable identifier used in configs, file names and reports.
  label: str  # Paper's short name, e.g. "breast carcinoma".
  species: str  # "human" or "canine".
  json_name: str  # Spelling in MIDOG++.json `images[].tumor_type`.
  csv_name: str  # Spelling in datasets_xvalidation.csv `Tumor`.

  @property
  def display(self) -> str:
    return f"{self.label} ({self.species})"


@dataclasses.dataclass(frozen=True)
class Scanner:
  slug: str
  name: str  # Name as printed in the paper's Table 2.
  csv_name: str  # Spelling in datasets_xvalidation.csv `Scanner`.
  spellings: tuple[str, ...]  # Other spellings seen in the paper.
  um_per_px: float  # Nominal resolution (paper, Table 1).


@dataclasses.dataclass(frozen=True)
class Domain:
  id: str  # "1a" ... "7"
  tumor: TumorType
  scanner: Scanner
  lab: str  # Spelling in datasets_xvalidation.csv `Origin`.
  cases: int  # Paper, Table 1.
  # Annotation totals (paper, Table 2, as counted in MIDOG++.json: the
  # printed table has one non-mitotic figure more in domains 2 and 5).
  mitotic_figures: int
  non_mitotic_figures: int

  @property
  def species(self) -> str:
    return self.tumor.species

  @property
  def um_per_px(self) -> float:
    return self.scanner.um_per_px


TUMOR_TYPES: tuple[TumorType, ...] = (
    TumorType("human_breast_carcinoma", "breast carcinoma", "human",
              "human breast cancer", "human breast cancer"),
    TumorType("canine_lung_carcinoma", "lung carcinoma", "canine",
              "canine lung cancer", "canine lung cancer"),
    TumorType("canine_lymphoma", "lymphosarcoma", "canine",
              "canine lymphosarcoma", "canine lymphoma"),
    TumorType("canine_mast_cell_tumor", "cutaneous mast cell tumor", "canine",
              "canine cutaneous mast cell tumor",
              "canine cutaneous mast cell tumor"),
    TumorType("human_neuroendocrine_tumor", "neuroendocrine tumor", "human",
              "human neuroendocrine tumor", "human neuroendocrine tumor"),
    TumorType("canine_soft_tissue_sarcoma", "soft tissue sarcoma", "canine",
              "canine soft tissue sarcoma", "canine soft tissue sarcoma"),
    TumorType("human_melanoma", "melanoma", "human",
              "human melanoma", "human melanoma"),
)

SCANNERS: tuple[Scanner, ...] = (
    # The CSV misspells it "Hamammatsu XR".
    Scanner("hamamatsu_xr", "Hamamatsu XR (C12000-22)", "Hamammatsu XR",
            ("Hamamatsu XR",), 0.23),
    Scanner("hamamatsu_s360", "Hamamatsu S360", "Hamamatsu S360",
            ("Hamamatsu S360 (0.5 N/A)",), 0.23),
    # The paper's Table 1 calls it "Leica ScanScope CS2" for domain 1c.
    Scanner("aperio_cs2", "Aperio ScanScope CS2", "Aperio CS2",
            ("Leica ScanScope CS2",), 0.25),
    Scanner("3dhistech_p250", "3DHistech Pannoramic Scan II", "3D Histech",
            (), 0.25),
)

LABS = ("UMC Utrecht", "VMU Vienna", "FU Berlin", "AMC New York")


def _scanner(slug: str) -> Scanner:
  return next(s for s in SCANNERS if s.slug == slug)


def _tumor(slug: str) -> TumorType:
  return next(t for t in TUMOR_TYPES if t.slug == slug)


DOMAINS: tuple[Domain, ...] = (
    Domain("1a", _tumor("human_breast_carcinoma"), _scanner("hamamatsu_xr"), "UMC Utrecht", 50, 451, 724),
    Domain("1b", _tumor("human_breast_carcinoma"), _scanner("hamamatsu_s360"), "UMC Utrecht", 50, 582, 1066),
    Domain("1c", _tumor("human_breast_carcinoma"), _scanner("aperio_cs2"), "UMC Utrecht", 50, 688, 924),
    Domain("2", _tumor("canine_lung_carcinoma"), _scanner("3dhistech_p250"), "VMU Vienna", 44, 855, 951),
    Domain("3", _tumor("canine_lymphoma"), _scanner("3dhistech_p250"), "VMU Vienna", 55, 3959, 4257),
    Domain("4", _tumor("canine_mast_cell_tumor"), _scanner("aperio_cs2"), "FU Berlin", 50, 2327, 1366),
    Domain("5", _tumor("human_neuroendocrine_tumor"), _scanner("hamamatsu_xr"), "UMC Utrecht", 55, 639, 1761),
    Domain("6a", _tumor("canine_soft_tissue_sarcoma"), _scanner("3dhistech_p250"), "AMC New York", 85, 1097, 2072),
    Domain("6b", _tumor("canine_soft_tissue_sarcoma"), _scanner("3dhistech_p250"), "VMU Vienna", 15, 189, 303),
    Domain("7", _tumor("human_melanoma"), _scanner("hamamatsu_xr"), "UMC Utrecht", 49, 1150, 925),
)

TUMOR_SLUGS: tuple[str, ...] = tuple(t.slug for t in TUMOR_TYPES)
DOMAIN_IDS: tuple[str, ...] = tuple(d.id for d in DOMAINS)


def _norm(name: str) -> str:
  return " ".join(name.replace("_", " ").replace("-", " ").lower().split())


_TUMOR_BY_SPELLING: dict[str, TumorType] = {}
for _t in TUMOR_TYPES:
  for _s in (_t.slug, _t.label, _t.json_name, _t.csv_name, _t.display):
    _TUMOR_BY_SPELLING[_norm(_s)] = _t

_SCANNER_BY_SPELLING: dict[str, Scanner] = {}
for _sc in SCANNERS:
  for _s in (_sc.slug, _sc.name, _sc.csv_name) + _sc.spellings:
    _SCANNER_BY_SPELLING[_norm(_s)] = _sc


def tumor_type(name: str) -> TumorType:
  """Looks a tumour type up by slug or any spelling used in the files."""
  try:
    return _TUMOR_BY_SPELLING[_norm(name)]
  except KeyError:
    raise KeyError(
        f"unknown tumour type {name!r}; known: {', '.join(TUMOR_SLUGS)}"
    ) from None


def scanner(name: str) -> Scanner:
  """Looks a scanner up by slug or any spelling used in the files."""
  try:
    return _SCANNER_BY_SPELLING[_norm(name)]
  except KeyError:
    known = sorted({s for sc in SCANNERS for s in (sc.name, sc.csv_name) + sc.spellings})
    raise KeyError(
        f"unknown scanner {name!r}; known spellings: {', '.join(known)}"
    ) from None


def domain(domain_id: str) -> Domain:
  for d in DOMAINS:
    if d.id == str(domain_id).lower():
      return d
  raise KeyError(f"unknown domain {domain_id!r}; known: {', '.join(DOMAIN_IDS)}")


def find_domain(tumor: str, scanner_name: str, lab: str) -> Domain:
  """The domain of a case from its tumour, scanner and lab (any spelling)."""
  t, sc = tumor_type(tumor), scanner(scanner_name)
  for d in DOMAINS:
    if d.tumor == t and d.scanner == sc and _norm(d.lab) == _norm(lab):
      return d
  raise KeyError(
      f"no domain has tumour {t.slug!r}, scanner {sc.slug!r} and lab {lab!r}")


def domains_of(tumor: str) -> tuple[Domain, ...]:
  t = tumor_type(tumor)
  return tuple(d for d in DOMAINS if d.tumor == t)


def parse_tumor_types(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
  """`"all"` or comma-separated spellings -> slugs in registry order."""
  if isinstance(spec, str):
    if spec.strip().lower() == "all":
      return TUMOR_SLUGS
    spec = [s for s in spec.split(",") if s.strip()]
  wanted = {tumor_type(s).slug for s in spec}
  return tuple(s for s in TUMOR_SLUGS if s in wanted)


def parse_domain_ids(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...] | None:
  """`"all"` -> None (no domain filter); comma-separated ids -> ids in registry order."""
  if isinstance(spec, str):
    if spec.strip().lower() == "all":
      return None
    spec = [s for s in spec.split(",") if s.strip()]
  wanted = {domain(s.strip()).id for s in spec}
  if not wanted:
    raise KeyError(f"no domain named in {spec!r}; known: {', '.join(DOMAIN_IDS)}")
  return tuple(i for i in DOMAIN_IDS if i in wanted)


def domain_set_name(ids) -> str:
  """A set of domains as one name, in registry order: ("1b", "1a") -> "1a+1b"."""
  ids = {domain(i).id for i in ids}
  return "+".join(i for i in DOMAIN_IDS if i in ids)


def parse_domain_set(name: str) -> tuple[str, ...]:
  """The inverse of `domain_set_name`."""
  return tuple(domain(i).id for i in name.split("+"))


DOMAIN_EXPERIMENT_PREFIX = "domains_"  # A run trained on some domains: "domains_1a+1b".


def domain_experiment_name(ids) -> str:
  """The experiment name of a run trained on the domains `ids`."""
  return DOMAIN_EXPERIMENT_PREFIX + domain_set_name(ids)
