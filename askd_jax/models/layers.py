"""Small layers whose semantics must match the official PyTorch code exactly."""
from __future__ import annotations

import functools
import math
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
  """(B, ..., C) -> (C,) float32 sums over every axis but the last (see `channel_sums`)."""
  return channel_sums(x)[0]


def channel_sums(*xs: jax.Array) -> tuple[jax.Array, ...]:
  """Per-channel float32 sums of same-shaped (B, ..., C) arrays, one pass over all of them.

  XLA:CPU runs the column reduction of an NHWC batch (and the reduce-window tree its
  tree-reduction pass splits it into) several times slower than a reduction over the
  batch axis alone, whose outputs are contiguous. So on CPU: one variadic reduction over
  (up to 32) images, into which XLA fuses the arrays' producers (a product such as x * x
  or dy * x is never written out), then a GEMV over the first spatial axis and a small sum
  over the rest. The sums of the BN statistics of a 32x112x112x64 batch: 23 -> 7 ms for
  sum(x * x); both of them in one pass. Each stage adds at most a few hundred terms, so the
  rounding stays near float32's (~2e-7 relative on that batch). Elsewhere the plain
  reduction (native on GPU/TPU)."""
  if jax.default_backend() != "cpu":
    return tuple(jnp.sum(x.astype(jnp.float32), axis=tuple(range(x.ndim - 1))) for x in xs)
  shape = xs[0].shape
  b, c = shape[0], shape[-1]
  k = max(d for d in range(1, min(b, 32) + 1) if b % d == 0)
  xs = [x.astype(jnp.float32).reshape((b // k, k) + shape[1:]) for x in xs]
  zero = jnp.zeros((), jnp.float32)
  parts = jax.lax.reduce(xs, [zero] * len(xs), _add_pairwise, (1,))  # each (B/k, ..., C)
  out = []
  for p in parts:
    rows = p.shape[0] * (p.shape[1] if p.ndim > 2 else 1)
    p = jnp.dot(jnp.ones((rows,), jnp.float32), p.reshape(rows, -1),
                precision=jax.lax.Precision.HIGHEST)
    out.append(jnp.sum(p.reshape(-1, c), axis=0))
  return tuple(out)


def square_sum(x: jax.Array) -> jax.Array:
  """float32 sum of x * x over every element (a gradient's squared norm).

  On CPU through `channel_sums` over a (rows, c) view of the flat array, c the largest
  power of two up to 4096 that divides its size: XLA:CPU's own full reduction runs as a
  reduce-window tree several times slower (the squared norm of the iResNet50 gradients,
  57M values: 78-114 ms -> 15 ms)."""
  x = x.astype(jnp.float32).reshape(-1)
  if jax.default_backend() != "cpu" or x.size < 8192:
    return jnp.sum(x * x)
  v = x.reshape(-1, math.gcd(x.size, 4096))
  return jnp.sum(channel_sums(v * v)[0])


def _add_pairwise(a, b):
  return [u + v for u, v in zip(a, b)]


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
  xf = x.astype(jnp.float32)
  sx, sxx = channel_sums(xf, xf * xf)
  mean = sx / n
  var = jnp.maximum(sxx / n - mean * mean, 0.0)
  rstd = jax.lax.rsqrt(var + epsilon)
  mul = scale * rstd
  add = bias - mean * mul
  y = x * mul.astype(x.dtype) + add.astype(x.dtype)
  return (y, jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)), (x, mean, rstd, scale)


def _bn_bwd_rule(epsilon, res, g):
  del epsilon
  # Three consumers read the cotangent (both sums, dx): on CPU it is materialised once
  # instead of having its producers (PReLU's or CBAM's backward) fused into each.
  return fusion_region(_bn_backward, res, g[0], probe=res[3])


def _bn_backward(res, dy):
  x, mean, rstd, scale = res
  c = x.shape[-1]
  n = x.size // c
  sdy, sdyx = channel_sums(dy, dy.astype(jnp.float32) * x.astype(jnp.float32))
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
  """`lax.conv_general_dilated` with, on CPU, a backward written for XLA:CPU.

  Applies to NHWC convolutions with explicit padding, no dilation and no groups (every
  convolution of the models); anything else, and every convolution off CPU, is XLA's own.

  * The kernel gradient is XLA's own convolution, but its two layout changes (the input to
    (C_in, H, W, B), the cotangent to (H, W, B, C_out), as Eigen's convolution wants them)
    are made from materialised arrays (`fusion_region`). XLA:CPU would otherwise fuse the
    producers of both (the BN before the convolution, the BN backward after it) into the
    transposing copy, which then runs ~3.5x slower than the copy alone (32x112x112x64:
    56 ms for the copy, 196 ms with one multiply-add fused in), and compute them twice.
    The result's layout change to (kh, kw, C_in, C_out) is a region of its own too, so the
    optimizer's updates and the gradient norm read a plain array (see `kernel_grad`).
  * The input gradient of the stride-2 3x3 (padding 1, from SUBPIXEL_MIN_PIXELS input
    pixels up) and 1x1 (padding 0) convolutions of even-sized inputs is computed sub-pixel
    (`subpixel_input_grad`). By autodiff it is a convolution over the cotangent dilated with
    zeros (`lhs_dilation=2`), which XLA:CPU does not hand to Eigen: on the iResNet's first
    stage (batch 32, 112x112x64) 130-190 ms, sub-pixel 57 ms; the 1x1 one 41 -> 17 ms.
    Other input gradients are XLA's transpose of the convolution.
  The forward is XLA's own; the parameters are unchanged."""
  strides = tuple(window_strides)
  own = (jax.default_backend() != "cpu" or kwargs or feature_group_count != 1
         or tuple(lhs_dilation or (1, 1)) != (1, 1) or tuple(rhs_dilation or (1, 1)) != (1, 1)
         or lhs.ndim != 4 or isinstance(padding, str) or not _is_nhwc(dimension_numbers, 4))
  if own:
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, precision=precision, **kwargs)
  padding = tuple(tuple(int(p) for p in pair) for pair in padding)
  kernel = rhs.shape[0]
  subpixel = (strides == (2, 2) and rhs.shape[:2] == (kernel, kernel) and kernel in (1, 3)
              and padding == ((kernel // 2, kernel // 2),) * 2
              and lhs.shape[1] % 2 == 0 and lhs.shape[2] % 2 == 0
              and (kernel == 1 or lhs.shape[1] * lhs.shape[2] >= SUBPIXEL_MIN_PIXELS))
  return _conv_cpu(lhs, rhs, strides, padding, precision, subpixel)


def _is_nhwc(dimension_numbers, ndim: int) -> bool:
  """Whether `dimension_numbers` (specs or ConvDimensionNumbers; None is NCHW) say NHWC."""
  as_numbers = lambda dn: jax.lax.conv_dimension_numbers((1,) * ndim, (1,) * ndim, dn)
  return dimension_numbers is not None and as_numbers(dimension_numbers) == as_numbers(_NHWC)


def _conv_forward(x, w, strides, padding, precision):
  return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC,
                                      precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv_cpu(x, w, strides, padding, precision, subpixel):
  return _conv_forward(x, w, strides, padding, precision)


def _conv_cpu_fwd(x, w, strides, padding, precision, subpixel):
  return _conv_forward(x, w, strides, padding, precision), (x, w)


def _conv_cpu_bwd(strides, padding, precision, subpixel, res, g):
  x, w = res
  if subpixel:
    dx = subpixel_input_grad(g, w, x.shape, precision)
  else:  # the conv is linear in x: its transpose, no forward re-evaluated
    dx = jax.linear_transpose(lambda x_: _conv_forward(x_, w, strides, padding, precision),
                              x)(g)[0]
  return dx, kernel_grad(x, g, w, strides, padding, precision)


_conv_cpu.defvjp(_conv_cpu_fwd, _conv_cpu_bwd)


def kernel_grad(x, g, w, strides, padding, precision=None):
  """d(kernel w) (kh, kw, C_in, C_out) of the NHWC convolution of x at cotangent g.

  The same convolution XLA's autodiff emits (input (C_in, H, W, B), the cotangent as a
  window-dilated (Ho, Wo, B, C_out) kernel, output (C_in, kh, kw, C_out)), with its three
  layout changes made as computations of their own (`fusion_region`): the two operands'
  from materialised arrays, and the result's, so that its consumers (the gradient norm,
  the optimizer's two updates) read a plain array instead of each transposing it again."""
  kh, kw = w.shape[:2]
  (lo_h, _), (lo_w, _) = padding
  ho, wo = g.shape[1:3]
  pads = [(lo_h, kh + strides[0] * (ho - 1) - x.shape[1] - lo_h),
          (lo_w, kw + strides[1] * (wo - 1) - x.shape[2] - lo_w)]
  xt = fusion_region(lambda v: jnp.transpose(v, (3, 1, 2, 0)), x, probe=w)
  gt = fusion_region(lambda v: jnp.transpose(v, (1, 2, 0, 3)), g, probe=w)
  dw = jax.lax.conv_general_dilated(xt, gt, (1, 1), pads, rhs_dilation=strides,
                                    dimension_numbers=_NHWC, precision=precision)
  return fusion_region(lambda v: jnp.transpose(v, (1, 2, 0, 3)).astype(w.dtype), dw, probe=w)


def fusion_region(fn, *args, probe=None):
  """fn(*args), on CPU as a computation of its own that XLA does not fuse into or out of.

  XLA:CPU fuses a chain of elementwise ops into every consumer that can take it:
  it computes the chain again in each, and inside a layout-changing copy it makes the copy
  several times slower. A `lax.cond` is opaque to fusion: its operands are materialised
  once, its branch is compiled on its own. Both branches are fn, so the predicate does not
  matter; it only has to be a value XLA cannot fold: whether the first element of `probe`
  (default: the first array of args; best a small replicated one, such as a parameter,
  so that a batch-sharded step needs no collective for it) equals itself, false for NaN.
  Elsewhere simply fn(*args)."""
  if jax.default_backend() != "cpu":
    return fn(*args)
  source = jax.tree.leaves(args)[0] if probe is None else probe
  p = jax.lax.slice(source.reshape(-1), (0,), (1,))[0]
  return jax.lax.cond(p == p, fn, fn, *args)


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
