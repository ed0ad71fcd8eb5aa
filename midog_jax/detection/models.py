"""Where detection's models come from: a run, a bundle folder, or the Hugging Face Hub.

`load("runs/all_domains/fold0")` (a training run: its best checkpoint),
`load("bundle/")` (every member of an exported bundle) and
`load("hf://owner/name@revision")` (a bundle on the Hub, downloaded through
`huggingface_hub` into its cache, pinned to the revision) all give
`detector.LoadedRun`s. `export_runs` writes runs as a bundle with its model
card (`bundle.py`, `card.py`).
"""

from __future__ import annotations

import os
import re
from typing import Sequence

import jax
import ml_collections
from flax import nnx

from midog_jax import atomic
from midog_jax.data import normalization as normalization_lib
from midog_jax.detection import bundle as bundle_lib
from midog_jax.detection import card as card_lib
from midog_jax.detection import detector
from midog_jax.detection import ensemble
from midog_jax.model import retinanet
from midog_jax.training import optim
from midog_jax.training import steps

HUB_PREFIX = "hf://"
_HUB = re.compile(r"hf://([\w.-]+/[\w.-]+)(?:@([\w./-]+))?$")
# config.json of a member holds the run's configuration; these files too, if it has them.
_RUN_FILES = ("normalization.json", "cases.json", "evaluation.json", "stain.json")


def hub_folder(spec: str) -> str:
  """The local folder of hf://owner/name[@revision], downloaded into the Hub's cache
  (or found there, offline)."""
  m = _HUB.match(spec)
  if not m:
    raise ValueError(f"{spec}: expected hf://owner/name or hf://owner/name@revision")
  repo, revision = m[1], m[2]
  # huggingface_hub only when a Hub model is named: its import is slow.
  import huggingface_hub
  from huggingface_hub import errors as hub_errors
  try:
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
      try:  # A commit never changes: once in the cache it needs no network.
        return huggingface_hub.snapshot_download(repo, revision=revision, local_files_only=True)
      except hub_errors.LocalEntryNotFoundError:
        pass
    # A branch or tag is looked up online (the cache answers when the Hub cannot).
    return huggingface_hub.snapshot_download(repo, revision=revision)
  except (hub_errors.LocalEntryNotFoundError, OSError) as e:
    at = f" --revision {revision}" if revision else ""
    raise FileNotFoundError(
        f"{spec}: not in the Hugging Face cache and the Hub cannot be reached ({type(e).__name__});"
        f" on a machine with internet run `hf download {repo}{at} --local-dir DIR`, copy DIR "
        "here and pass --model DIR") from None
  except hub_errors.HfHubHTTPError as e:
    raise FileNotFoundError(f"{spec}: the Hub refused it ({str(e).splitlines()[0]}); check "
                            "the name and the revision") from None


def load(spec: str, checkpoint: str | None = None) -> list[detector.LoadedRun]:
  """The model(s) of `spec`: a run's workdir, a bundle folder or hf://owner/name[@rev]."""
  path = hub_folder(spec) if spec.startswith(HUB_PREFIX) else spec
  if bundle_lib.is_bundle(path):
    if checkpoint:
      raise ValueError(f"{spec}: a bundle holds one checkpoint per member; --checkpoint is "
                       "for training runs")
    return load_bundle(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{spec}: no such folder; pass a training run's workdir, a bundle "
                            "folder or hf://owner/name")
  return [detector.load_run(path, checkpoint)]


def load_bundle(path: str) -> list[detector.LoadedRun]:
  """Every member of a bundle, checked against its checksums, names and shapes."""
  index = bundle_lib.read_index(path)
  runs = []
  for member in index["members"]:
    folder = os.path.join(path, member)
    config = ml_collections.ConfigDict(atomic.read_json(os.path.join(folder, "config.json")))
    norm = normalization_lib.Normalization.load(os.path.join(folder, "normalization.json"))
    norm = detector.with_stain(norm, os.path.join(folder, "stain.json"))
    graphdef, params, batch_stats = abstract_network(config)
    params, batch_stats = bundle_lib.unflatten(bundle_lib.read_arrays(path, member), params,
                                               batch_stats, os.path.join(folder, bundle_lib.WEIGHTS))
    step = int(atomic.read_json(os.path.join(folder, "run.json"))["step"])
    runs.append(detector.LoadedRun(folder, step, config, norm, graphdef, params, batch_stats))
  return runs


def abstract_network(config) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, params, batch_stats) of the run's network, shapes only."""
  model_config = retinanet.RetinaNetConfig.from_config(config, pretrained=False)
  graphdef, state = steps.abstract_train_state(
      lambda: retinanet.RetinaNet(model_config, rngs=nnx.Rngs(0)),
      optim.from_config(config, total_steps=1),
      jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  return graphdef, state.params, state.batch_stats


def member_of(run: detector.LoadedRun, name: str) -> dict:
  """A bundle member (bundle.write's shape) from a loaded run."""
  files = {"config.json": run.config.to_dict(),
           "run.json": {"step": run.step, "source": os.path.basename(run.workdir.rstrip("/")),
                        "package_version": bundle_lib.package_version()}}
  for file in _RUN_FILES:  # As the run wrote them.
    path = os.path.join(run.workdir, file)
    if os.path.exists(path):
      files[file] = atomic.read_json(path)
  evaluation = files.get("evaluation.json")
  if evaluation is not None and evaluation.get("checkpoint_step") != run.step:
    del files["evaluation.json"]  # Of another checkpoint: its threshold does not apply.
  return {"name": name, "files": files,
          "arrays": bundle_lib.flatten(run.params, run.batch_stats)}


def export_runs(workdirs: Sequence[str], out: str, checkpoint: str | None = None,
                license_id: str = "other") -> str:
  """Writes the runs (one, or e.g. an experiment's folds) as one bundle."""
  runs = [detector.load_run(w, checkpoint) for w in workdirs]
  names = ["model"] if len(runs) == 1 else [os.path.basename(w.rstrip("/")) for w in workdirs]
  if len(set(names)) != len(names):
    raise ValueError(f"two runs named alike ({', '.join(names)}); export them one by one")
  members = [member_of(r, n) for r, n in zip(runs, names)]
  thresholds = [m["files"].get("evaluation.json", {}).get("threshold") for m in members]
  extra = {"operating_point": (sum(thresholds) / len(thresholds)
                               if None not in thresholds else None)}
  return bundle_lib.write(out, members, card_lib.model_card(members, extra, license_id), extra)


def operating_point(runs: Sequence[detector.LoadedRun], threshold: float | None = None
                    ) -> tuple[float, str]:
  """(operating point, where it came from) of one model or an ensemble: `threshold`
  when given; else one model's chosen on its validation fold, an ensemble's the mean
  of its members' (see `ensemble`)."""
  if len(runs) == 1 or threshold is not None:
    return detector.operating_point(runs[0], threshold)
  points = [detector.operating_point(r, None) for r in runs]
  chosen = sum(s.startswith("chosen") for _, s in points)
  return (sum(p for p, _ in points) / len(points),
          f"the mean of the {len(runs)} members' operating points, {chosen} of them chosen "
          "on their validation folds")


def detector_for(runs: Sequence[detector.LoadedRun], min_score: float | None = None,
                 batch_size: int | None = None, threshold: float | None = None,
                 progress: bool = False):
  """(detector, operating point, where it came from) of one model or an ensemble."""
  operating, source = operating_point(runs, threshold)
  if len(runs) == 1:
    return detector.Detector(runs[0], min_score, batch_size, progress), operating, source
  return ensemble.EnsembleDetector(runs, min_score, batch_size, progress), operating, source
