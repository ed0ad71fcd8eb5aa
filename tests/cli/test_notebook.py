"""Runs the Colab notebook's cells on CPU in demo mode, so it cannot rot."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

from tests.helpers import ROOT


def test_notebook_runs_in_demo_mode(tmp_path, monkeypatch):
  nb = nbformat.read(ROOT / "colab" / "midog_jax_colab.ipynb", as_version=4)
  monkeypatch.setenv("MIDOG_NOTEBOOK_TINY", "1")
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
  monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.setenv("PYTHONPATH", str(ROOT))
  client = NotebookClient(nb, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
  assert "f1_overall" in text and "JAX" in text
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) >= 2  # The heatmap and at least one overlay, inline.
  assert (tmp_path / "midog_run" / "summary.json").exists()
