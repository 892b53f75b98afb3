"""Small layers whose semantics must match the official PyTorch code exactly."""
from __future__ import annotations

import functools
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
      y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
      if not self.is_initializing():
        n = x.size // c
        unbiased = var * (n / max(n - 1, 1))
        ra_mean.value = (1.0 - self.momentum) * ra_mean.value + self.momentum * mean
        ra_var.value = (1.0 - self.momentum) * ra_var.value + self.momentum * unbiased
      return y
    mul = scale * jax.lax.rsqrt(ra_var.value + self.epsilon)
    add = bias - ra_mean.value * mul
    return x * mul.astype(self.dtype) + add.astype(self.dtype)


def channel_sum(x: jax.Array) -> jax.Array:
  """(B, ..., C) -> (C,) float32 sums over every axis but the last.

  On CPU, first a matrix-vector product over the batch (ones(B) @ x.reshape(B, -1)), then
  a sum of the much smaller (..., C) result: XLA:CPU runs the column reduction of an NHWC
  batch (and the reduce-window split its tree-reduction pass adds) several times slower
  (BN statistics of a 32x56x56x64 batch: 84 -> 24 ms; this sum alone 18 -> 1.6 ms). The
  batch-first order also keeps the rounding small (a GEMV over all rows at once is 60x less
  accurate) and nearly independent of how the batch is split over devices. Elsewhere the
  plain reduction (native on GPU/TPU)."""
  if jax.default_backend() == "cpu":
    ones = jnp.ones((x.shape[0],), x.dtype)
    s = jnp.tensordot(ones, x, axes=(0, 0), precision=jax.lax.Precision.HIGHEST,
                      preferred_element_type=jnp.float32)
    return jnp.sum(s.reshape(-1, x.shape[-1]), axis=0)
  return jnp.sum(x.astype(jnp.float32), axis=tuple(range(x.ndim - 1)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x, scale, bias, epsilon: float):
  """Training-mode BN over all axes but the last: (y, batch mean, biased batch variance).

  Statistics in float32, the normalisation in x's dtype. The backward is the closed form
  (two column sums of the cotangent, one elementwise pass); mean and variance are for the
  running statistics only: gradients through them are not propagated (the layer
  stop-gradients them; they never reach a loss)."""
  return _bn_forward(x, scale, bias, epsilon)[0]


def _bn_forward(x, scale, bias, epsilon):
  c = x.shape[-1]
  n = x.size // c
  mean = channel_sum(x) / n
  xf = x.astype(jnp.float32)
  var = jnp.maximum(channel_sum(xf * xf) / n - mean * mean, 0.0)
  rstd = jax.lax.rsqrt(var + epsilon)
  mul = scale * rstd
  add = bias - mean * mul
  y = x * mul.astype(x.dtype) + add.astype(x.dtype)
  return (y, jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)), (x, mean, rstd, scale)


def _bn_bwd_rule(epsilon, res, g):
  del epsilon
  x, mean, rstd, scale = res
  dy = g[0]
  c = x.shape[-1]
  n = x.size // c
  sdy = channel_sum(dy)                                     # sum dy
  sdyx = channel_sum(dy.astype(jnp.float32) * x.astype(jnp.float32))
  dscale = (sdyx - mean * sdy) * rstd                       # sum dy * xhat
  k = scale * rstd
  # dx = k (dy - mean(dy) - xhat mean(dy xhat)), xhat = (x - mean) rstd
  a = k * rstd * dscale / n
  xc = x.astype(jnp.float32) - mean  # centred first: no cancellation when |mean| >> std
  dx = dy.astype(jnp.float32) * k - xc * a - k * sdy / n
  return dx.astype(x.dtype), dscale, sdy


batch_norm_train.defvjp(_bn_forward, _bn_bwd_rule)


class PReLU(nn.Module):
  """Per-channel PReLU (torch.nn.PReLU(num_parameters=C)), slopes start at 0.25."""
  init_value: float = 0.25

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    alpha = self.param("alpha", nn.initializers.constant(self.init_value),
                       (x.shape[-1],), jnp.float32)
    return prelu(x, alpha)


@jax.custom_vjp
def prelu(x: jax.Array, alpha: jax.Array) -> jax.Array:
  """max(x, 0) + alpha * min(x, 0) per channel (last axis); alpha float32. The slope's
  gradient is a column sum (a GEMV on CPU, see `channel_sum`), not XLA's reduction."""
  return jnp.where(x >= 0, x, x * alpha.astype(x.dtype))


def _prelu_fwd(x, alpha):
  return prelu(x, alpha), (x, alpha)


def _prelu_bwd(res, g):
  x, alpha = res
  neg = x < 0
  dx = jnp.where(neg, g * alpha.astype(g.dtype), g)
  gx = jnp.where(neg, g.astype(jnp.float32) * x.astype(jnp.float32), 0.0)
  return dx, channel_sum(gx)


prelu.defvjp(_prelu_fwd, _prelu_bwd)


def conv(features: int, kernel: int, stride: int = 1, *, dtype: Dtype, name: str | None = None,
         use_bias: bool = False) -> nn.Conv:
  """Conv with PyTorch's padding (kernel // 2) and the official xavier-uniform init."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=use_bias, dtype=dtype,
                 param_dtype=jnp.float32, kernel_init=nn.initializers.xavier_uniform(),
                 conv_general_dilated=conv_general_dilated, name=name)


# Stride-2 3x3 convolutions whose input gradient is computed sub-pixel on CPU: from this
# many input pixels (28 x 28) up it is faster than XLA:CPU's own (at 14 x 14 it is not).
# The 1x1 ones are, at every size.
SUBPIXEL_MIN_PIXELS = 28 * 28
_NHWC = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, **kwargs):
  """`lax.conv_general_dilated`, except for the stride-2 NHWC convolutions of even-sized
  inputs on CPU: 1x1 (padding 0), and 3x3 (padding 1) from SUBPIXEL_MIN_PIXELS pixels up.

  Their input gradient is, by XLA's autodiff, a convolution over the cotangent dilated with
  zeros (`lhs_dilation=2`), which XLA:CPU does not hand to Eigen: on the iResNet's first
  stage (batch 32, 112x112x64) it takes 130-190 ms. Written sub-pixel it is two stride-1
  convolutions of the cotangent (even input rows: a 1x2 window, odd rows: 2x2), each
  giving both column phases as 2 x C_in channels, which is already the interleaved row;
  the two row phases are then stacked: 57 ms. The 1x1 one is a matmul put on the even
  pixels (41 -> 17 ms on that stage). The forward and the kernel's gradient are XLA's
  own."""
  kernel = rhs.shape[0]
  plain = (jax.default_backend() != "cpu" or tuple(window_strides) != (2, 2)
           or kwargs or feature_group_count != 1
           or tuple(lhs_dilation or (1, 1)) != (1, 1) or tuple(rhs_dilation or (1, 1)) != (1, 1)
           or lhs.ndim != 4 or rhs.shape[:2] != (kernel, kernel) or kernel not in (1, 3)
           or [tuple(p) for p in padding] != [(kernel // 2, kernel // 2)] * 2
           or lhs.shape[1] % 2 or lhs.shape[2] % 2
           or (kernel == 3 and lhs.shape[1] * lhs.shape[2] < SUBPIXEL_MIN_PIXELS)
           or not _is_nhwc(dimension_numbers, lhs.ndim))
  if plain:
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, precision=precision, **kwargs)
  return _conv_s2(lhs, rhs, precision)


def _is_nhwc(dimension_numbers, ndim: int) -> bool:
  """Whether `dimension_numbers` (specs or ConvDimensionNumbers; None is NCHW) say NHWC."""
  as_numbers = lambda dn: jax.lax.conv_dimension_numbers((1,) * ndim, (1,) * ndim, dn)
  return dimension_numbers is not None and as_numbers(dimension_numbers) == as_numbers(_NHWC)


def _conv_s2_forward(x, w, precision):
  k = w.shape[0]
  return jax.lax.conv_general_dilated(x, w, (2, 2), [(k // 2, k // 2)] * 2,
                                      dimension_numbers=_NHWC, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_s2(x, w, precision):
  return _conv_s2_forward(x, w, precision)


def _conv_s2_fwd(x, w, precision):
  return _conv_s2_forward(x, w, precision), (x, w)


def _conv_s2_bwd(precision, res, g):
  x, w = res
  # The conv is linear in w: its transpose is the kernel gradient, no forward re-evaluated.
  kernel_grad = jax.linear_transpose(lambda w_: _conv_s2_forward(x, w_, precision), w)
  return subpixel_input_grad(g, w, x.shape, precision), kernel_grad(g)[0]


def subpixel_input_grad(g, w, x_shape, precision=None):
  """d(input) of the stride-2 NHWC conv of `w` (3x3 pad 1 or 1x1 pad 0; even H, W) at
  cotangent g (B, H/2, W/2, C_out).

  Input pixel (2i + a, 2j + b) receives the taps of w whose offsets have parity (a, b):
  with 3x3 and padding 1, kernel row 1 reaches even rows from output row i, rows 2 and 0
  reach odd rows from output rows i and i + 1. So every phase (a, b) is a window of g at
  (i + di, j + dj), di, dj in {0, 1}, with kernel entries w[1 + a - 2 di, 1 + b - 2 dj]
  (zero outside 0..2)."""
  b, h, wd, ci = x_shape
  ho, wo = g.shape[1], g.shape[2]
  wt = jnp.swapaxes(w, 2, 3).astype(g.dtype)  # (k, k, C_out, C_in)
  if w.shape[0] == 1:
    z = jnp.einsum("bhwo,io->bhwi", g, w[0, 0].astype(g.dtype), precision=precision)
    z = jnp.pad(z[:, :, None, :, None, :], ((0, 0), (0, 0), (0, 1), (0, 0), (0, 1), (0, 0)))
    return z.reshape(b, h, wd, ci)
  gp = jnp.pad(g, ((0, 0), (0, 1), (0, 1), (0, 0)))
  zero = jnp.zeros_like(wt[0, 0])
  rows = []
  for a in (0, 1):  # even input rows: kernel row 1 only; odd rows: kernel rows 2 and 0
    taps = [[jnp.concatenate([_tap(wt, 1 + a - 2 * di, 1 + c - 2 * dj, zero) for c in (0, 1)],
                             axis=-1) for dj in (0, 1)] for di in range(1 + a)]
    k = jnp.stack([jnp.stack(t) for t in taps])  # (1 + a, 2, C_out, 2 * C_in)
    # Output channels (c, C_in) next to the Wo axis: (Wo, 2, C_in) is already (W, C_in).
    rows.append(jax.lax.conv_general_dilated(gp[:, :ho + a], k, (1, 1), "VALID",
                                             dimension_numbers=_NHWC, precision=precision))
  return jnp.stack(rows, axis=2).reshape(b, h, wd, ci)


def _tap(wt, kh, kw, zero):
  return wt[kh, kw] if 0 <= kh < 3 and 0 <= kw < 3 else zero


_conv_s2.defvjp(_conv_s2_fwd, _conv_s2_bwd)
