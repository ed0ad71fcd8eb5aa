"""The model card of a bundle: Hugging Face's README.md, YAML front matter and text.

What a colleague needs to trust and reuse a model: what it was trained on
(experiment, tumour types, the cases of each fold), the protocol, its test
F1 and AP per tumour type, the data's licence and how to load it. Made only
from the bundle's own files, so the same runs give the same card.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from midog_jax import domains

_DATA = ("MIDOG++ (Aubreville et al., Scientific Data 10:484, 2023; images on figshare for "
         "public non-restricted access, annotations under CC0 as MIDOG++.json declares)")


def _f(value) -> str:
  return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _metrics_table(members: Sequence[Mapping[str, Any]]) -> list[str]:
  """One row per tumour type of the test split, one column pair per member."""
  evaluated = [m for m in members if m["files"].get("evaluation.json")]
  if not evaluated:
    return ["Not evaluated: run `python -m midog_jax.eval --runs` on the runs before "
            "exporting them to put their test metrics here."]
  head = "| tumour type | " + " | ".join(f"{m['name']} F1 | {m['name']} AP" for m in evaluated) + " |"
  lines = [head, "|" + " --- |" * (1 + 2 * len(evaluated))]
  tumours = [t for t in domains.TUMOR_SLUGS
             if any(t in m["files"]["evaluation.json"]["test"]["tumor_types"] for m in evaluated)]
  for t in tumours + ["overall"]:
    cells = []
    for m in evaluated:
      test = m["files"]["evaluation.json"]["test"]
      row = test["overall"] if t == "overall" else test["tumor_types"].get(t, {})
      cells += [_f(row.get("f1")), _f(row.get("ap"))]
    lines.append(f"| {t} | " + " | ".join(cells) + " |")
  return lines


def model_card(members: Sequence[Mapping[str, Any]], extra: Mapping[str, Any],
               license_id: str = "other") -> str:
  """README.md of a bundle of `members` (bundle.write's shape)."""
  config = members[0]["files"]["config.json"]
  experiment = config.get("experiment", "?")
  tumours = [t for t in str(config.get("tumor_types", "")).split(",") if t] or ["all"]
  front = ["---", "library_name: midog-jax", f"license: {license_id}",
           "pipeline_tag: object-detection", "tags:", "- histopathology", "- mitosis-detection",
           "- midog", "- retinanet", "- jax", "datasets:", "- MIDOG++", "---", ""]
  lines = [f"# midog-jax: {experiment}", "",
           f"A RetinaNet ({config.get('model', {}).get('backbone', 'resnet18')} body) trained "
           f"by midog-jax to detect mitotic figures in H&E-stained regions of interest, "
           f"{len(members)} member(s): {', '.join(m['name'] for m in members)}.", "",
           "## Training", "",
           f"- Data: {_DATA}.",
           f"- Experiment `{experiment}`: tumour types {', '.join(tumours)}.",
           f"- Protocol: {config.get('num_epochs')} epochs, batch {config.get('batch_size')}, "
           f"{config.get('patch_size')} px patches, guided sampling, one-cycle AdamW "
           f"(max lr {config.get('optim', {}).get('max_lr')}); model selection by "
           f"`{config.get('eval', {}).get('selection')}`; fold {config.get('fold')} of "
           f"{config.get('num_folds')} (per member below).",
           "- The cases each member trained and validated on: `<member>/cases.json`.", ""]
  lines += ["| member | fold | step | train cases | validation cases | operating point |",
            "| --- | --- | --- | --- | --- | --- |"]
  for m in members:
    files = m["files"]
    cases = files.get("cases.json", {})
    threshold = files.get("evaluation.json", {}).get("threshold")
    lines.append(f"| {m['name']} | {files['config.json'].get('fold')} | {files['run.json']['step']} | "
                 f"{len(cases.get('train', []))} | {len(cases.get('valid', []))} | {_f(threshold)} |")
  lines += ["", "## Test results (the MIDOG scorer, threshold chosen on each member's "
            "validation fold)", "", *_metrics_table(members), ""]
  if len(members) > 1:
    lines += [f"Ensemble operating point: {_f(extra.get('operating_point'))} (the mean of the "
              "members' thresholds).", ""]
  lines += ["## Use", "", "```bash", "pip install midog-jax",
            "python -m midog_jax.detect --model hf://OWNER/NAME@REVISION --images roi.tiff "
            "--out predictions.json", "```", "",
            "or `--model DIR` with this folder. Every file is checked against the sha256 in "
            "`bundle.json` before use; the weights are float32 safetensors named by their "
            "place in the network.", ""]
  return "\n".join(front + lines)
