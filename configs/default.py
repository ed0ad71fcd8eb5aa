"""The reference code's settings (the MIDOG++ paper's RetinaNet baseline).

  python -m midog_jax.train --config configs/default.py --workdir W \
      --config.data_dir=~/tensorflow_datasets --config.fold=0
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.data_dir = ml_collections.FieldReference(None, field_type=str)  # TFDS data dir.
  # Experiment: the tumour types trained on ("all", or comma-separated, any
  # spelling the registry knows) and the cross-validation fold (0-4).
  config.experiment = "all_domains"
  config.tumor_types = "all"
  # Domains trained on, within those tumour types: "all", or comma-separated ids
  # of midog_jax/domains.py (e.g. "1a,1b"; configs/leave_one_domain_out.py).
  config.domains = "all"
  config.fold = 0
  config.num_folds = 5  # The reference's StratifiedKFold(5, shuffle=True, random_state=42).
  config.fold_seed = 42
  # A workdir refuses a configuration that changes its run; True continues anyway.
  config.resume_anyway = False
  config.seed = 0

  # Sampling: the reference's patch counts per epoch.
  config.patch_size = 512
  config.batch_size = 12  # Global, over all devices and hosts.
  config.train_patches_per_epoch = 1000
  config.valid_patches_per_epoch = 250
  config.guided_fraction = 0.5
  config.num_epochs = 100  # Reference code: 100; the paper: 200.
  config.cache_bytes = 48 << 30  # Decoded ROIs kept in host RAM (roi_store "ram").
  # "disk": each ROI decoded once per dataset to a raw file and memory-mapped
  # (shared by every run); "ram": decoded by each run; "auto": disk where the
  # folder is local, writable and has room, else ram.
  config.roi_store = "auto"
  config.decoded_dir = ml_collections.FieldReference(None, field_type=str)  # Default: beside the dataset.
  config.stream_window = 8  # Batches cropped together (fewer decodes when streaming).
  config.prefetch = 2
  # Threads cropping patches on the host (same batches for any number);
  # 0: the cores this process may use, at most 8.
  config.input_workers = 0

  # Stain normalisation of every image, in training and detection alike, to a
  # target fitted on the training cases: "macenko" (Macenko et al. 2009),
  # "reinhard" (L*a*b* statistics) or "none" (the reference).
  config.stain_normalization = "none"

  config.model = ml_collections.ConfigDict()
  config.model.levels = (4,)  # Stride-16 level: `sizes=[32]` at 512 px.
  config.model.num_classes = 2  # Column 1 is never positive, as the reference.
  config.model.dtype = "float32"  # "bfloat16" on accelerators.
  # torchvision's ImageNet weights, as the reference (fetched once, see
  # midog_jax/model/weights.py); a .safetensors/.npz path; or "none" (from scratch).
  config.model.body_weights = "imagenet"
  config.model.backbone = "resnet18"  # A key of midog_jax/model/backbones.py's BACKBONES.
  config.model.channels = 128  # Width of the FPN and the heads (the reference's).

  config.loss = ml_collections.ConfigDict()
  config.loss.focal = "reference"  # 0.75 positives / 0.25 negatives; or "standard".
  config.loss.gamma = 2.0

  config.optim = ml_collections.ConfigDict()
  config.optim.max_lr = 5e-5
  config.optim.weight_decay = 0.01
  config.optim.b2 = 0.99
  config.optim.pct_start = 0.3
  # The paper's discriminative rate, fastai's slice(first, last) over the layer
  # groups stem..layer2 | layer3, layer4 | FPN and heads; None: max_lr for all.
  config.optim.discriminative = ml_collections.FieldReference(None, field_type=tuple)

  config.augment = ml_collections.ConfigDict()
  config.augment.enabled = True
  config.augment.max_warp = 0.2
  config.augment.max_rotate = 10.0
  config.augment.max_zoom = 2.0
  config.augment.p_affine = 0.5
  config.augment.brightness = (0.25, 0.75)
  config.augment.contrast = (0.5, 2.0)
  config.augment.p_lighting = 0.5
  # Colour augmentations by name (midog_jax/data/augment.py's COLOUR_AUGMENTATIONS),
  # after lighting; the reference has none. Stain augmentation: "hed_light" or
  # "hed_strong" (Tellez et al. 2018's HED jitter, sigma 0.05 or 0.2).
  config.augment.colour = ()
  # RandStainNA (Shen et al. 2022): each patch's colour statistics moved to a
  # template drawn from the training cases' ("lab" or "hsv" space; "none": off,
  # the reference); the drawn spread scaled by randstainna_sigma.
  config.augment.randstainna = "none"
  config.augment.randstainna_sigma = 1.0
  # Targets: figures whose centre is in the patch, as the reference. True also
  # labels those of the crop's margin that rotation and warping bring into view.
  config.augment.margin_targets = False

  # Model selection: the epoch with the best validation AP is kept.
  config.eval = ml_collections.ConfigDict()
  config.eval.every_epochs = 1  # 0: no AP (and no best checkpoint).
  # "reference": the reference's Pascal VOC AP (IoU 0.3) on each epoch's freshly
  # drawn validation patches (midog_jax/training/selection.py); "roi_ap": this project's
  # alternative, the scorer's AP on the full validation ROIs.
  config.eval.selection = "reference"
  # Detections kept per window for prediction files and "roi_ap": the
  # reference's detect_thresh, so AP is computed on what the paper's AP saw.
  config.eval.score_threshold = 0.5
  config.eval.max_detections_per_window = 100
  # Windows overlap by 10 % (the reference's, at 512 px) but at least this many
  # px (one box), so that below 512 px a figure on an edge is whole in a window.
  config.eval.window_min_overlap = 50
  config.eval.batch_size = 16

  config.log_every_steps = 10
  return config
