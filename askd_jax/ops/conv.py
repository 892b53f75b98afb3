"""The NHWC convolution with a backward written for XLA:CPU, and fusion regions.

On the iResNet50 CPU train step the convolutions' backward was where XLA:CPU lost most:
the stride-2 input gradients ran as a convolution over a zero-dilated cotangent that
XLA:CPU does not hand to Eigen (8 per step, 612 ms), and the kernel gradient's layout
changes recomputed their fused producers several times slower (docs/benchmarks.md).
Off CPU (`cpu=False`) every function here is XLA's own.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Stride-2 3x3 convolutions whose input gradient is computed sub-pixel on CPU: from this
# many input pixels (28 x 28) up it is faster than XLA:CPU's own (at 14 x 14 it is not).
# The 1x1 ones are, at every size.
SUBPIXEL_MIN_PIXELS = 28 * 28
_NHWC = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, *, cpu: bool, **kwargs):
  """`lax.conv_general_dilated` with, on CPU (`cpu`), a backward written for XLA:CPU; a
  layer takes it as `functools.partial(conv_general_dilated, cpu=...)`.

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
  own = (not cpu or kwargs or feature_group_count != 1
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
  xt = fusion_region(lambda v: jnp.transpose(v, (3, 1, 2, 0)), x, cpu=True, probe=w)
  gt = fusion_region(lambda v: jnp.transpose(v, (1, 2, 0, 3)), g, cpu=True, probe=w)
  dw = jax.lax.conv_general_dilated(xt, gt, (1, 1), pads, rhs_dilation=strides,
                                    dimension_numbers=_NHWC, precision=precision)
  return fusion_region(lambda v: jnp.transpose(v, (1, 2, 0, 3)).astype(w.dtype), dw, cpu=True,
                       probe=w)


def fusion_region(fn, *args, cpu: bool, probe=None):
  """fn(*args), on CPU (`cpu`) as a computation of its own that XLA does not fuse into or
  out of.

  XLA:CPU fuses a chain of elementwise ops into every consumer that can take it:
  it computes the chain again in each, and inside a layout-changing copy it makes the copy
  several times slower. A `lax.cond` is opaque to fusion: its operands are materialised
  once, its branch is compiled on its own. Both branches are fn, so the predicate does not
  matter; it only has to be a value XLA cannot fold: whether the first element of `probe`
  (default: the first array of args; best a small replicated one, such as a parameter,
  so that a batch-sharded step needs no collective for it) equals itself, false for NaN.
  Elsewhere simply fn(*args)."""
  if not cpu:
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
