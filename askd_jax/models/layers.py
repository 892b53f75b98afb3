"""Small layers whose semantics must match the official PyTorch code exactly.

Each layer that computes through askd_jax.ops has a `cpu_ops` field (whether to use the
XLA:CPU formulations, set by the task for the platform the model runs on) and passes it
on; the parameters are the same either way."""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from askd_jax import ops

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
  cpu_ops: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    if train:
      y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, self.cpu_ops)
      if not self.is_initializing():
        n = x.size // c
        unbiased = var * (n / max(n - 1, 1))
        ra_mean.value = (1.0 - self.momentum) * ra_mean.value + self.momentum * mean
        ra_var.value = (1.0 - self.momentum) * ra_var.value + self.momentum * unbiased
      return y
    mul = scale * jax.lax.rsqrt(ra_var.value + self.epsilon)
    add = bias - ra_mean.value * mul
    return x * mul.astype(self.dtype) + add.astype(self.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x, scale, bias, epsilon: float, cpu: bool):
  """Training-mode BN over all axes but the last: (y, batch mean, biased batch variance).

  Statistics in float32, the normalisation in x's dtype. The backward is the closed form
  (two column sums of the cotangent, one elementwise pass); mean and variance are for the
  running statistics only: gradients through them are not propagated (the layer
  stop-gradients them; they never reach a loss)."""
  return _bn_forward(x, scale, bias, epsilon, cpu)[0]


def _bn_forward(x, scale, bias, epsilon, cpu):
  c = x.shape[-1]
  n = x.size // c
  xf = x.astype(jnp.float32)
  sx, sxx = ops.channel_sums(xf, xf * xf, cpu=cpu)
  mean = sx / n
  var = jnp.maximum(sxx / n - mean * mean, 0.0)
  rstd = jax.lax.rsqrt(var + epsilon)
  mul = scale * rstd
  add = bias - mean * mul
  y = x * mul.astype(x.dtype) + add.astype(x.dtype)
  return (y, jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)), (x, mean, rstd, scale)


def _bn_bwd_rule(epsilon, cpu, res, g):
  del epsilon
  # Three consumers read the cotangent (both sums, dx): on CPU it is materialised once
  # instead of having its producers (PReLU's or CBAM's backward) fused into each.
  return ops.fusion_region(_BN_BACKWARD[cpu], res, g[0], cpu=cpu, probe=res[3])


def _bn_backward(res, dy, cpu):
  x, mean, rstd, scale = res
  c = x.shape[-1]
  n = x.size // c
  sdy, sdyx = ops.channel_sums(dy, dy.astype(jnp.float32) * x.astype(jnp.float32), cpu=cpu)
  dscale = (sdyx - mean * sdy) * rstd                       # sum dy * xhat
  k = scale * rstd
  # dx = k (dy - mean(dy) - xhat mean(dy xhat)), xhat = (x - mean) rstd
  a = k * rstd * dscale / n
  xc = x.astype(jnp.float32) - mean  # centred first: no cancellation when |mean| >> std
  dx = dy.astype(jnp.float32) * k - xc * a - k * sdy / n
  return dx.astype(x.dtype), dscale, sdy


# One function object per choice: JAX caches the traced branches of a `lax.cond` by function,
# so every BN backward of a model reuses one trace.
_BN_BACKWARD = {cpu: functools.partial(_bn_backward, cpu=cpu) for cpu in (True, False)}


batch_norm_train.defvjp(_bn_forward, _bn_bwd_rule)


class PReLU(nn.Module):
  """Per-channel PReLU (torch.nn.PReLU(num_parameters=C)), slopes start at 0.25."""
  init_value: float = 0.25
  cpu_ops: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    alpha = self.param("alpha", nn.initializers.constant(self.init_value),
                       (x.shape[-1],), jnp.float32)
    return prelu(x, alpha, self.cpu_ops)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def prelu(x: jax.Array, alpha: jax.Array, cpu: bool) -> jax.Array:
  """max(x, 0) + alpha * min(x, 0) per channel (last axis); alpha float32. The slope's
  gradient is a column sum (`ops.channel_sum`)."""
  return jnp.where(x >= 0, x, x * alpha.astype(x.dtype))


def _prelu_fwd(x, alpha, cpu):
  return prelu(x, alpha, cpu), (x, alpha)


def _prelu_bwd(cpu, res, g):
  x, alpha = res
  neg = x < 0
  dx = jnp.where(neg, g * alpha.astype(g.dtype), g)
  gx = jnp.where(neg, g.astype(jnp.float32) * x.astype(jnp.float32), 0.0)
  return dx, ops.channel_sum(gx, cpu=cpu)


prelu.defvjp(_prelu_fwd, _prelu_bwd)


def conv(features: int, kernel: int, stride: int = 1, *, dtype: Dtype, cpu_ops: bool,
         name: str | None = None, use_bias: bool = False) -> nn.Conv:
  """Conv with PyTorch's padding (kernel // 2) and the official xavier-uniform init,
  through `ops.conv_general_dilated`."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=use_bias, dtype=dtype,
                 param_dtype=jnp.float32, kernel_init=nn.initializers.xavier_uniform(),
                 conv_general_dilated=ops_conv(cpu_ops), name=name)


def ops_conv(cpu_ops: bool):
  """The `conv_general_dilated` an `nn.Conv` of a model with this `cpu_ops` takes."""
  return functools.partial(ops.conv_general_dilated, cpu=cpu_ops)

