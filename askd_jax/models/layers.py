"""Small layers whose semantics must match the official PyTorch code exactly."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

Dtype = Any


class BatchNorm(nn.Module):
  """BatchNorm with PyTorch semantics (the official checkpoints' statistics).

  Differs from `flax.linen.BatchNorm` in one way that matters for parity: the running
  variance is updated with the *unbiased* batch variance, as `torch.nn.BatchNorm*d`
  does. Statistics are always computed in float32 (mixed-precision policy); the
  normalisation itself runs in the compute dtype as one multiply-add. Under `jax.jit`
  with the batch sharded over a mesh, XLA reduces over the global batch.

  Variables: params `scale`, `bias`; batch_stats `mean`, `var`.
  """
  momentum: float = 0.1  # PyTorch convention: new = (1 - m) * old + m * batch
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    if train:
      axes = tuple(range(x.ndim - 1))
      xf = x.astype(jnp.float32)
      mean = jnp.mean(xf, axes)
      var = jnp.maximum(jnp.mean(jnp.square(xf), axes) - jnp.square(mean), 0.0)
      if not self.is_initializing():
        n = x.size // c
        unbiased = var * (n / max(n - 1, 1))
        ra_mean.value = (1.0 - self.momentum) * ra_mean.value + self.momentum * mean
        ra_var.value = (1.0 - self.momentum) * ra_var.value + self.momentum * unbiased
    else:
      mean, var = ra_mean.value, ra_var.value
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    add = bias - mean * mul
    return x * mul.astype(self.dtype) + add.astype(self.dtype)


class PReLU(nn.Module):
  """Per-channel PReLU (torch.nn.PReLU(num_parameters=C)), slopes start at 0.25."""
  init_value: float = 0.25

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    alpha = self.param("alpha", nn.initializers.constant(self.init_value),
                       (x.shape[-1],), jnp.float32)
    return jnp.where(x >= 0, x, x * alpha.astype(x.dtype))


def conv(features: int, kernel: int, stride: int = 1, *, dtype: Dtype, name: str | None = None,
         use_bias: bool = False) -> nn.Conv:
  """Conv with PyTorch's padding (kernel // 2) and the official xavier-uniform init."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=use_bias, dtype=dtype,
                 param_dtype=jnp.float32, kernel_init=nn.initializers.xavier_uniform(),
                 name=name)
