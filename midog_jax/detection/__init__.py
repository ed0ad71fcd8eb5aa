"""The detection stage: a trained run applied to whole images and whole slides.

  sliding_window  the jitted window detector: windows, threshold, NMS, whole-image merge
  detector        a run loaded for detection (best checkpoint, normalisation, operating point)
  outputs         the OUTPUT_FORMATS table `detect` writes: MIDOG JSON, GeoJSON, overlay
  predictions     MIDOG challenge prediction files (mm) and QuPath GeoJSON (px)
  models          where models come from: a run, a bundle folder, hf://owner/name@revision
  bundle          a model as one folder: safetensors, configuration, checksums (export, verify)
  card            a bundle's model card (Hugging Face README.md)
  ensemble        several models in one vmapped call, their detections fused
  slides          whole slides: windows over tissue, bands that resume, counts
  slide_outputs   a counted slide's files (MIDOG JSON, GeoJSON, CSV, picture) and summary.csv
  hotspot         counts per mm² of tissue and the exact hotspot (pure functions)

Add an output format: a writer and an `OutputFormat` in
`outputs.OUTPUT_FORMATS` (README.md, "Where to add an output format"). One
edge runs against the stage order: the overlay format draws hits and misses
with `evaluation.overlay`, which matches as the scorer does.
"""
