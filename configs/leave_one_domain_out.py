"""Train on the other domains of a domain's tumour type: `--config configs/leave_one_domain_out.py:1c`.

`1c` trains on domains 1a and 1b (human breast carcinoma scanned by the
Hamamatsu XR and S360) and leaves out the Aperio CS2, the MIDOG 2021 setting
of three scanners, one unseen; `eval --runs` scores every test domain. A
second part names a stain switch of SWITCHES: `leave_one_domain_out.py:1c,macenko`.
`plan()` lists a leave-one-scanner-out plan: every breast-carcinoma scanner
left out once, with each switch.
"""

from configs import default
from midog_jax import domains

# Stain switches by name: the config fields each sets ("none": the paper's).
SWITCHES = {
    "none": {},
    "hed_light": {"augment.colour": ("hed_light",)},
    "hed_strong": {"augment.colour": ("hed_strong",)},
    "randstainna": {"augment.randstainna": "lab"},
    "randstainna_hsv": {"augment.randstainna": "hsv"},
    "macenko": {"stain_normalization": "macenko"},
    "reinhard": {"stain_normalization": "reinhard"},
}
# The measured comparison (benchmarks/README.md): one of each kind.
PLAN_SWITCHES = ("none", "hed_light", "randstainna", "macenko")


def training_domains(left_out: str) -> tuple[str, ...]:
  """The domains of `left_out`'s tumour type other than it, in registry order."""
  d = domains.domain(left_out)
  others = tuple(x.id for x in domains.domains_of(d.tumor.slug) if x.id != d.id)
  if not others:
    # KeyError, as the registry's lookups raise: the commands report it in one line.
    raise KeyError(f"domain {d.id} is the only domain of {d.tumor.display}: nothing is "
                   "left to train on; leave out 1a, 1b, 1c or 6a, 6b")
  return others


def get_config(spec: str | None = None):
  left_out, _, switch = (spec or "1c").partition(",")
  switch = switch or "none"
  if switch not in SWITCHES:
    raise KeyError(f"stain switch {switch!r}: expected one of {', '.join(SWITCHES)}")
  train = training_domains(left_out)
  config = default.get_config()
  config.experiment = domains.domain_experiment_name(train)
  config.tumor_types = domains.domain(left_out).tumor.slug
  config.domains = ",".join(train)
  for key, value in SWITCHES[switch].items():
    node, (*path, last) = config, key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return config


def plan(left_out=("1a", "1b", "1c"), switches=PLAN_SWITCHES) -> list[tuple[str, str]]:
  """(run name, experiment spec) of leaving each of `left_out` out with each switch."""
  return [(f"without_domain_{d}/{s}", f"leave_one_domain_out={d},{s}")
          for d in left_out for s in switches]
