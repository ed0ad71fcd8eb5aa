"""Test setup: eight fake CPU devices for data-parallel tests, one compilation cache."""

import atexit
import os
import shutil
import tempfile

# Must be set before JAX is first imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# One XLA compilation cache for the session and every process it starts: the
# many tiny training runs compile the same programs, and compiling is most of
# their time on CPU. Cached executables are the ones XLA would build again.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="midog-jax-tests-xla-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory):
  """A built synthetic `midogpp` (3 cases per domain, 192 x 160 px, 2 shards)."""
  from tests.train_fixtures import build_synthetic
  return build_synthetic(tmp_path_factory.mktemp("synthetic_midogpp"))


@pytest.fixture(scope="session")
def synthetic_layouts(synthetic_data_dir):
  """{shards: data dir}: the same synthetic images built as 1, 2 and 7 shards."""
  import pathlib
  from tests.train_fixtures import build_layout
  root = pathlib.Path(synthetic_data_dir).parent
  out = {2: synthetic_data_dir}
  for n in (1, 7):
    out[n] = build_layout(root / "manual", root / f"tfds-{n}-shards", n)
  return out


@pytest.fixture(scope="session")
def plan_runs(tmp_path_factory, synthetic_data_dir):
  """`experiments run --plan all --folds 0,1` with a tiny configuration."""
  from midog_jax import experiments
  from tests.train_fixtures import network_flags
  workdir = tmp_path_factory.mktemp("plan")
  # The runs are subprocesses: one CPU device each compiles and runs faster.
  saved = os.environ.pop("XLA_FLAGS", None)
  try:
    code = experiments.main([
        "run", "--plan", "all", "--workdir", str(workdir), "--folds", "0,1", "--parallel", "2",
        "--data-dir", synthetic_data_dir, "--set", "patch_size=64", "--set", "num_epochs=2",
        "--set", "batch_size=8", "--set", "train_patches_per_epoch=32",
        "--set", "valid_patches_per_epoch=8", "--set", "eval.batch_size=8",
        "--set", "prefetch=0", "--set", "model.body_weights=none",
        # 64 px windows with 50 px overlap would be 5 x the windows: tests keep 10 %.
        "--set", "eval.window_min_overlap=0",
        *(a for flag in network_flags("") for a in ("--set", flag))])
  finally:
    if saved is not None:
      os.environ["XLA_FLAGS"] = saved
  assert code == 0
  return workdir
