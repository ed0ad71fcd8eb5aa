"""Layers shared by every body and head: torch-padded convolutions, torch's BatchNorm.

Initialisers follow torch: Kaiming-normal (untruncated) with fan-in for the
FPN and heads (fastai's conv2d), fan-out for the body (torchvision).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = nnx.initializers.Initializer

# torch's `kaiming_normal_`.
KAIMING_IN = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")
KAIMING_OUT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def _pad(k: int) -> tuple[tuple[int, int], tuple[int, int]]:
  # Torch pads symmetrically; "SAME" would pad stride-2 convs asymmetrically.
  return ((k // 2, k // 2), (k // 2, k // 2))


def conv(cin: int, cout: int, k: int, stride: int = 1, *, bias: bool,
         init: Initializer, dtype: jnp.dtype, rngs: nnx.Rngs,
         bias_init: Initializer = nnx.initializers.zeros) -> nnx.Conv:
  """A k x k convolution padded like torch's `padding=k // 2`."""
  return nnx.Conv(cin, cout, (k, k), (stride, stride), padding=_pad(k),
                  use_bias=bias, kernel_init=init, bias_init=bias_init,
                  dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


class BatchNorm(nnx.Module):
  """BatchNorm with torch semantics (momentum 0.1, unbiased running var).

  Statistics and the folded scale/shift are float32; the output is in the
  compute dtype.
  """

  def __init__(self, features: int, *, eps: float = 1e-5,
               momentum: float = 0.1, dtype: jnp.dtype = jnp.float32):
    self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((features,), jnp.float32))
    self.eps, self.momentum, self.dtype = eps, momentum, dtype

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    xf = x.astype(jnp.float32)
    if train:
      axes = tuple(range(x.ndim - 1))
      mean = xf.mean(axes)
      var = jnp.maximum(jnp.square(xf).mean(axes) - jnp.square(mean), 0.0)
      n = x.size // x.shape[-1]
      m = self.momentum
      self.mean[...] = jax.lax.stop_gradient(
          (1 - m) * self.mean[...] + m * mean)
      self.var[...] = jax.lax.stop_gradient(
          (1 - m) * self.var[...] + m * var * (n / max(n - 1, 1)))
    else:
      mean, var = self.mean[...], self.var[...]
    mul = self.scale[...] * jax.lax.rsqrt(var + self.eps)
    return (xf * mul + (self.bias[...] - mean * mul)).astype(self.dtype)
