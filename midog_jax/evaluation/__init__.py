"""The evaluation stage: scores as the MIDOG challenge computes them, and the paper's tables.

  metrics        greedy point matching, pooled F1, COCO-style AP, threshold choice
  score          a prediction file scored against the annotations
  runs           finished runs evaluated on the test split (threshold from validation)
  ensembles      each experiment's folds as one ensemble, fused from their test predictions
  domain_matrix  the paper's domain matrices (Tables 4-7, Figures 3-4): CSV, Markdown, PNG
  domain_experiments  runs trained on some domains: matrices over test domains, the
                 held-out domains' scores per stain switch side by side
  paper          the paper's published matrices, as data (paper_results.json)
  overlay        detections and ground truth drawn over an image
  end_to_end     the demo's five stages on a synthetic MIDOG++, each timed

A new metric goes into `metrics` and the report of `metrics.summarize`.
"""
