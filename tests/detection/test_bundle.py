"""Bundles: export -> load gives the run's detections; same bytes; tamper and Hub cache."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from midog_jax.detection import bundle
from midog_jax.detection import detector
from midog_jax.detection import models
from tests.helpers import ROOT, env_without_accelerators


@pytest.fixture(scope="module")
def run_dir(plan_runs):
  return str(plan_runs / "all_domains" / "fold0")


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("bundles")
  return (models.export_runs([run_dir], str(out / "a")),
          models.export_runs([run_dir], str(out / "b")))


def _image(seed=0):
  return np.random.default_rng(seed).integers(0, 256, (150, 170, 3), np.uint8)


def test_a_bundle_detects_as_its_run_and_exports_the_same_bytes(run_dir, exported):
  a, b = exported
  for root, _, names in os.walk(a):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f, open(path.replace(a, b, 1), "rb") as g:
        assert f.read() == g.read(), name  # Deterministic: nothing varies between exports.
  [loaded] = models.load(a)
  run = detector.load_run(run_dir)
  assert loaded.step == run.step
  image = _image()
  xy, scores = detector.Detector(run, threshold=0.0)(image)
  xy2, scores2 = detector.Detector(loaded, threshold=0.0)(image)
  assert len(scores) > 0
  np.testing.assert_array_equal(xy, xy2)
  np.testing.assert_array_equal(scores, scores2)
  card = open(os.path.join(a, "README.md"), encoding="utf-8").read()
  assert card.startswith("---\nlibrary_name: midog-jax\n") and "## Test results" in card


def test_a_tampered_or_truncated_bundle_is_one_line(exported, tmp_path):
  a, _ = exported
  damaged = tmp_path / "damaged"
  shutil.copytree(a, damaged)
  weights = damaged / "model" / bundle.WEIGHTS
  data = bytearray(weights.read_bytes())
  data[len(data) // 2] ^= 1
  weights.write_bytes(bytes(data))
  with pytest.raises(bundle.BundleError, match=r"model\.safetensors: damaged \(its sha256"):
    models.load(str(damaged))
  weights.write_bytes(bytes(data[:1000]))
  with pytest.raises(bundle.BundleError, match="damaged"):
    models.load(str(damaged))
  (damaged / "model" / "config.json").unlink()
  with pytest.raises(bundle.BundleError, match=r"config\.json: missing from the bundle"):
    models.load(str(damaged))


def test_a_bundle_loads_without_tensorflow_or_orbax(exported):
  a, _ = exported
  code = ("import sys\n"
          "for m in ('tensorflow', 'orbax', 'orbax.checkpoint', 'tensorflow_datasets'):\n"
          "  sys.modules[m] = None  # Any import of them fails.\n"
          "from midog_jax.detection import models\n"
          f"[run] = models.load({a!r})\n"
          "print('loaded', run.step)\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env=env_without_accelerators(), cwd=ROOT, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.startswith("loaded ")


def test_hub_models_load_from_the_cache_pinned_and_offline_say_how(exported, tmp_path,
                                                                    monkeypatch):
  from huggingface_hub import constants
  a, _ = exported
  commit = "0123456789abcdef0123456789abcdef01234567"
  # The Hub cache's layout: models--OWNER--NAME/snapshots/<commit>/ and refs/<branch>.
  repo = tmp_path / "hub" / "models--lab--mitosis"
  shutil.copytree(a, repo / "snapshots" / commit)
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text(commit)
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
  monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # Nothing listens there.
  [run] = models.load(f"hf://lab/mitosis@{commit}")
  [local] = models.load(a)
  assert run.step == local.step
  np.testing.assert_array_equal(np.asarray(run.params["body"]["conv1"]["kernel"][...]),
                                np.asarray(local.params["body"]["conv1"]["kernel"][...]))
  with pytest.raises(FileNotFoundError, match=r"hf download lab/other --revision v1 "
                                              r"--local-dir DIR"):
    models.load("hf://lab/other@v1")
