"""Runs trained before the stage packages still restore, resume and detect.

The saved names are the train state's tree (attribute names of the network,
the optimiser's state and layer-group names), not module paths. The layouts
were recorded from checkpoints of the earlier code (commit c36f19b); here a
checkpoint is written from that record alone and read by today's code.
"""

import json
import pathlib

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import default
from configs import demo
from midog_jax.data import normalization
from midog_jax.detection import detector
from midog_jax.model import retinanet
from midog_jax.training import checkpoints
from midog_jax.training import optim
from midog_jax.training import steps
from midog_jax.training import workdir

LAYOUT = json.loads((pathlib.Path(__file__).parent / "checkpoint_layout_c36f19b.json").read_text())


def _discriminative():
  config = default.get_config()
  config.optim.discriminative = (5e-5, 5e-4)
  return config


CONFIGS = {"demo": demo.get_config, "default_discriminative": _discriminative}


def _key(entry) -> str:
  for attr in ("key", "name"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return f"#{entry.idx}"  # A sequence index, as the record marks it.


def _abstract_state(config):
  tx = optim.from_config(config, total_steps=100)
  _, state = steps.abstract_train_state(
      lambda: retinanet.RetinaNet(retinanet.RetinaNetConfig.from_config(config, pretrained=False),
                                  rngs=nnx.Rngs(0)),
      tx, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  return state


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_train_state_has_the_recorded_names_and_shapes(name):
  state = _abstract_state(CONFIGS[name]())
  now = {"/".join(_key(k) for k in path): list(leaf.shape)
         for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}
  recorded = {path: shape for path, shape in LAYOUT[name] if shape is not None}
  assert sorted(now) == sorted(recorded)
  assert now == recorded


def _tree_from_record(entries):
  """The nested dicts and lists Orbax saved, each array filled with its index."""
  root: dict = {}
  for i, (path, shape) in enumerate(entries):
    node, keys = root, path.split("/")
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = None if shape is None else np.full(shape, i, np.float32)

  def lists(node):
    if not isinstance(node, dict):
      return node
    if node and all(k.startswith("#") for k in node):
      return [lists(node[f"#{j}"]) for j in range(len(node))]
    return {k: lists(v) for k, v in node.items()}
  return lists(root)


def _old_run(tmp_path) -> pathlib.Path:
  """A workdir as the earlier code left it: no model.backbone, no augment.colour."""
  run = tmp_path / "run"
  run.mkdir()
  config = json.loads(demo.get_config().to_json_best_effort())
  del config["model"]["backbone"], config["augment"]["colour"]
  (run / "config.json").write_text(json.dumps(config))
  normalization.Normalization((200.0, 150.0, 190.0), (30.0, 40.0, 30.0)).save(run / "normalization.json")
  ckpt = checkpoints.RunCheckpoints(str(run))
  ckpt.save(24, _tree_from_record(LAYOUT["demo"]), {"step": 24, "valid_ap": 0.5})
  ckpt.close()
  return run


def test_a_run_of_the_earlier_code_restores_resumes_and_detects(tmp_path):
  run = _old_run(tmp_path)
  loaded = detector.load_run(str(run))
  assert loaded.step == 24
  index = {path: i for i, (path, _) in enumerate(LAYOUT["demo"])}
  for path, leaf in jax.tree_util.tree_flatten_with_path(loaded.params)[0]:
    name = "params/" + "/".join(_key(k) for k in path)
    np.testing.assert_array_equal(np.asarray(leaf), index[name], err_msg=name)

  # The recorded configuration (without the fields added since) resumes unchanged.
  config = ml_collections.ConfigDict(json.loads((run / "config.json").read_text()))
  current = json.loads(demo.get_config().to_json_best_effort())
  assert workdir.differences(config.to_dict(), current) == []
  changed = dict(current, model=dict(current["model"], backbone="toy"))
  assert workdir.differences(config.to_dict(), changed) == ['model.backbone: "resnet18" -> "toy"']

  # And it detects (weights of constants: the output is defined, its values are not the point).
  xy, scores = detector.Detector(loaded)(np.full((160, 200, 3), 200, np.uint8))
  assert xy.shape[1:] == (2,) and len(xy) == len(scores)
