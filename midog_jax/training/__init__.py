"""The training stage: one (experiment, fold) run in a work directory, crash-safe.

  trainer        the loop: resume, epochs, validation, checkpoints, summary
  group          run groups: K runs of one network trained together, in one program
  steps          the train state and the jitted steps (train, a group's train, validation
                 loss, patch detection)
  inputs         what a run reads: cases, folds, normalisation, inputs, selection metric
  selection      the SELECTION_METRICS table (`config.eval.selection`): reference, roi_ap
  optim          AdamW on fastai's one-cycle schedules, discriminative layer groups
  checkpoints    Orbax checkpoints: latest and best step of a run, damaged steps set aside
  orbax_errors   Orbax failures in one line: reason, remedy, the noise held back
  workdir        a run's lock and recorded configuration
  metric_writer  per-epoch metrics: JSON lines and TensorBoard; the summary's lines
  launcher       the paper's experiment plans, trained as processes (one run or a group each)

Add a selection metric: a builder in `selection.SELECTION_METRICS`
(README.md, "Where to add a selection metric"). One edge runs against the
stage order: the "roi_ap" selection metric detects whole validation ROIs
with `detection.sliding_window` and scores them with `evaluation.metrics`,
as evaluation will.
"""
