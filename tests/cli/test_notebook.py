"""Runs the Colab notebook's cells on CPU at toy scale, so it cannot rot.

The real-data mode builds one tumour type from a folder of synthetic TIFFs in
the real formats (what the builder would otherwise download), trains fold 0,
evaluates and draws overlays, as it does with the real files on Colab.
"""

import nbformat
import pytest
from nbclient import NotebookClient

from midog_jax.data import synthetic
from tests.helpers import ROOT


# The demo mode's cell runs `python -m midog_jax.demo` with the flags tests/cli/test_demo.py
# runs; the real-data mode runs every other cell.
@pytest.mark.parametrize("mode", ("real",))
def test_notebook_runs(mode, tmp_path, monkeypatch):
  nb = nbformat.read(ROOT / "colab" / "midog_jax_colab.ipynb", as_version=4)
  monkeypatch.setenv("MIDOG_NOTEBOOK_TINY", "1")
  monkeypatch.setenv("MIDOG_NOTEBOOK_DATA", mode)
  if mode == "real":  # Six cases per domain: five train cases of the tumour type for 5 folds.
    synthetic.write_dataset(str(tmp_path / "manual"), 6, 192, 160, progress=False)
    monkeypatch.setenv("MIDOG_NOTEBOOK_MANUAL_DIR", str(tmp_path / "manual"))
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
  assert "JAX" in text and "cpu x 1 -> single_domain.py:canine_lymphoma" in text
  assert "epoch 2/2" in text  # The trainer's lines, shown in the cell.
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) >= 2  # The heatmap and at least one overlay, inline.
  tables = [o for o in outputs if "text/markdown" in o.get("data", {})]
  assert tables and "|" in tables[0]["data"]["text/markdown"]
  run = ("run" if mode == "demo" else "runs/single_canine_lymphoma/fold0")
  assert (tmp_path / "midog_run" / run / "summary.json").exists()
