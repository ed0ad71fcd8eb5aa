"""midog-jax: the MIDOG++ mitotic figure detection baseline in JAX/Flax.

Stage packages, in import order (each imports only those before it, except
the edges their docstrings name):

  data/        MIDOG++ files, the TFDS dataset, sampling, crops, augmentation, input pipeline
  model/       the RetinaNet, its backbones, boxes, losses, pretrained weights
  training/    the train loop, steps, selection, optimiser, checkpoints, experiment launcher
  detection/   the sliding-window detector, loaded runs and bundles, ensembles, output
               formats, whole slides
  evaluation/  the MIDOG metrics, scoring, run evaluation, the paper's domain matrices

Shared by all: `domains` (the one registry of tumour types, scanners and
domains), `sharding` (the device mesh), `atomic` (files written whole or not
at all), `console` (logging and progress for the command lines), `commands` (help,
usage errors and broken pipes of every command line).

Entry points (parse, call the stages, print): `python -m midog_jax.X` for X in
train, eval, detect, slides, export, demo, stats, experiments, synthetic, weights.
"""

__version__ = "0.1.0"
