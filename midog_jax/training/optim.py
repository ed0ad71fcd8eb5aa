"""AdamW with fastai v1's one-cycle learning-rate and β1 schedules.

The reference trains with fastai v1's `fit_one_cycle` (`OneCycleScheduler`):
`n` steps are split into `a1 = int(n * pct_start)` warm-up steps and `n - a1`
annealing steps, both cosine (`annealing_cos`). The learning rate goes from
max / div_factor to max, then to max / final_div (fastai: final_div =
div_factor * 1e4, so max / 250,000); β1 goes 0.95 -> 0.85 -> 0.95 over the
same phases. Step 0 uses the start values; the value after step k is the
phase's annealing at k / (phase length), as fastai's `Stepper` computes it.

fastai's `true_wd` decay is `p <- p * (1 - lr * wd)` next to an Adam step
with β = (β1, 0.99), eps 1e-8, on every parameter including BatchNorm's
(`bn_wd=True`); `optax.adamw` with the scheduled rate does exactly this.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from midog_jax.model import backbones

# The layer groups of the discriminative rate, in order, as object_detection_fastai
# splits its RetinaNet (`learn.split([model.encoder[6], model.c5top5])`): the
# body's early layers (ResNet: stem to layer2), its late layers (the
# backbone's `late_layers`; ResNet: layer3 and layer4), then the FPN with both
# heads. The names are keys of the optimiser state in every checkpoint.
EARLY, LATE, HEAD = "body_to_layer2", "body_layer3_4", "fpn_and_heads"
LAYER_GROUPS = (EARLY, LATE, HEAD)


def _one_cycle(start: float, peak: float, end: float, total_steps: int,
               pct_start: float) -> optax.Schedule:
  """start -> peak -> end by two cosine phases over `total_steps`."""
  if total_steps < 1:
    raise ValueError(f"total_steps must be positive, got {total_steps}")
  if not 0.0 <= pct_start <= 1.0:
    raise ValueError(f"pct_start must be in [0, 1], got {pct_start}")
  a1 = int(total_steps * pct_start)
  # fastai's Stepper runs every phase for at least one step.
  n1, n2 = max(1, a1), max(1, total_steps - a1)

  def cos(a: float, b: float, pct: jax.Array) -> jax.Array:
    # fastai's `b + (a - b) / 2 * (cos(pi * pct) + 1)`. The weight of `a`,
    # (cos(pi * pct) + 1) / 2, is written so that float32 keeps it accurate
    # near both ends (where the end value may be 1e-5 of the start).
    w = jnp.where(pct <= 0.5, jnp.cos(jnp.pi / 2 * pct) ** 2,
                  jnp.sin(jnp.pi / 2 * (1 - pct)) ** 2)
    return a * w + b * (1 - w)

  def schedule(count: jax.Array | int) -> jax.Array:
    k = jnp.asarray(count, jnp.float32)
    up = cos(start, peak, jnp.clip(k / n1, 0.0, 1.0))
    down = cos(peak, end, jnp.clip((k - n1) / n2, 0.0, 1.0))
    return jnp.where(k <= n1, up, down)

  return schedule


def one_cycle(max_lr: float, total_steps: int, pct_start: float = 0.3,
              div_factor: float = 25.0, final_div: float | None = None
              ) -> optax.Schedule:
  """fastai v1's one-cycle learning rate: max/div -> max -> max/final_div.

  `final_div` defaults to fastai's `div_factor * 1e4` (250,000 for 25).
  """
  final_div = div_factor * 1e4 if final_div is None else final_div
  return _one_cycle(max_lr / div_factor, max_lr, max_lr / final_div,
                    total_steps, pct_start)


def one_cycle_b1(total_steps: int, pct_start: float = 0.3,
                 moms: tuple[float, float] = (0.95, 0.85)) -> optax.Schedule:
  """fastai v1's one-cycle momentum (Adam's β1): moms[0] -> moms[1] -> moms[0]."""
  return _one_cycle(moms[0], moms[1], moms[0], total_steps, pct_start)


def _key(entry: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def param_groups(params: Any, late_layers: Collection[str] = backbones.get(None).late_layers,
                 body_key: str = "body") -> Any:
  """A pytree like `params` labelling each leaf with its LAYER_GROUPS entry.

  With `nnx.split(model, nnx.Param, ...)` the body is `model.body`; its
  top-level children named in `late_layers` (the backbone's) are the second
  group, its other children the first; the rest (FPN, classifier, box
  regressor) is the last group.
  """
  def label(path: tuple[Any, ...], _: Any) -> str:
    if not path or _key(path[0]) != body_key:
      return HEAD
    return LATE if len(path) > 1 and _key(path[1]) in late_layers else EARLY
  return jax.tree_util.tree_map_with_path(label, params)


def even_mults(start: float, stop: float, n: int) -> list[float]:
  """fastai v1's `even_mults`: n rates evenly spaced in log from start to stop."""
  if n == 1:
    return [stop]
  step = (stop / start) ** (1 / (n - 1))
  return [start * step ** i for i in range(n)]


def make_optimizer(
    total_steps: int,
    max_lr: float = 5e-5,
    *,
    weight_decay: float = 0.01,
    b2: float = 0.99,
    eps: float = 1e-8,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div: float | None = None,
    moms: tuple[float, float] = (0.95, 0.85),
    discriminative: tuple[float, float] | None = None,
    groups: Callable[[Any], Any] = param_groups,
) -> optax.GradientTransformation:
  """AdamW on fastai v1's one-cycle schedules, as the reference trains.

  Args:
    total_steps: optimiser steps of the whole run (epochs x batches).
    max_lr: peak learning rate of the whole net (reference code: 5e-5).
    weight_decay: decoupled decay; each step multiplies parameters by
      (1 - lr * weight_decay).
    b2, eps: Adam's β2 and epsilon (fastai: 0.99, PyTorch's 1e-8).
    pct_start, div_factor, final_div, moms: the one-cycle shape, see
      `one_cycle` and `one_cycle_b1`.
    discriminative: (first, last) peak learning rates instead of `max_lr`,
      as fastai's `max_lr=slice(first, last)`: `even_mults` over the three
      LAYER_GROUPS (paper: (5e-5, 5e-4) gives 5e-5, 1.58e-4, 5e-4); every
      group follows the same one-cycle shape.
    groups: params -> pytree of LAYER_GROUPS labels, for `discriminative`.

  Hyperparameters are injected, so the state records the current learning
  rate(s) and β1 (`optax.inject_hyperparams`).
  """
  b1 = one_cycle_b1(total_steps, pct_start, moms)

  def adamw(peak: float) -> optax.GradientTransformation:
    lr = one_cycle(peak, total_steps, pct_start, div_factor, final_div)
    return optax.inject_hyperparams(optax.adamw)(
        learning_rate=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)

  if discriminative is None:
    return adamw(max_lr)
  first, last = discriminative
  peaks = even_mults(first, last, len(LAYER_GROUPS))
  return optax.multi_transform(
      {name: adamw(peak) for name, peak in zip(LAYER_GROUPS, peaks)}, groups)


def from_config(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """The optimiser of a run's `config` over `total_steps`, with its backbone's layer groups."""
  o = config.optim
  late = backbones.get(config.model.get("backbone")).late_layers
  return make_optimizer(
      total_steps, max_lr=o.max_lr, weight_decay=o.weight_decay, b2=o.b2,
      pct_start=o.pct_start, discriminative=tuple(o.discriminative) if o.discriminative else None,
      groups=functools.partial(param_groups, late_layers=late))


def hyperparams(opt_state: Any) -> dict[str, Any]:
  """{name: value} of the injected hyperparameters now, per group if split.

  E.g. {"learning_rate": ..., "b1": ...} or {"fpn_and_heads/learning_rate": ...}.
  """
  if hasattr(opt_state, "hyperparams"):
    return dict(opt_state.hyperparams)
  out = {}
  for group, state in getattr(opt_state, "inner_states", {}).items():
    inner = getattr(state, "inner_state", state)
    for name, value in getattr(inner, "hyperparams", {}).items():
      out[f"{group}/{name}"] = value
  return out
