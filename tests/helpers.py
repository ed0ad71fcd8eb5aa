"""Shared test utilities."""

import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The real annotation files (MIDOG++.json, datasets_xvalidation.csv): in
# $MIDOGPP_ANNOTATIONS_DIR, else beside the checkout. Tests that need them are skipped without.
REAL = pathlib.Path(os.environ.get("MIDOGPP_ANNOTATIONS_DIR", ROOT.parent / "shared" / "midogpp"))
REAL_JSON = REAL / "MIDOG++.json"
REAL_CSV = REAL / "datasets_xvalidation.csv"

needs_real_files = pytest.mark.skipif(
    not REAL_JSON.exists(),
    reason=f"real annotation files not found in {REAL} (set MIDOGPP_ANNOTATIONS_DIR=DIR)")


def env_without_accelerators() -> dict[str, str]:
  env = dict(os.environ)
  env.update(CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
  return env
