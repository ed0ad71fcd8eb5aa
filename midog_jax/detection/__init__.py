"""The detection stage: a trained run applied to whole images.

  sliding_window  the jitted window detector: windows, threshold, NMS, whole-image merge
  detector        a run loaded for detection (best checkpoint, normalisation, operating point)
  outputs         the OUTPUT_FORMATS table `detect` writes: MIDOG JSON, GeoJSON, overlay
  predictions     MIDOG challenge prediction files (mm) and QuPath GeoJSON (px)

Add an output format: a writer and an `OutputFormat` in
`outputs.OUTPUT_FORMATS` (README.md, "Where to add an output format"). One
edge runs against the stage order: the overlay format draws hits and misses
with `evaluation.overlay`, which matches as the scorer does.
"""
