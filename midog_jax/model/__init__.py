"""The model stage: the reference RetinaNet and what defines its training signal.

  retinanet   RetinaNet (body + FPN + heads), its config, builder, forward and scores
  backbones   the BACKBONES table: bodies by `config.model.backbone`
  resnet      torchvision's ResNet18, the reference's body
  layers      torch-padded convolutions and torch's BatchNorm
  boxes       anchors, box coding, IoU and anchor matching (pure functions)
  losses      the reference's focal loss and smooth L1
  weights     pretrained body weights: fetched, read, checked, loaded

Add a backbone: a module returning C3, C4, C5, and a `Backbone` entry in
`backbones.BACKBONES` (README.md, "Where to add a backbone"). This package
imports only the shared flat modules (`sharding`, `atomic`).
"""
