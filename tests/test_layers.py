"""The CPU formulations in models/layers.py and models/cbam.py against XLA's plain ops."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from askd_jax.models import cbam, layers

NHWC = ("NHWC", "HWIO", "NHWC")


def _conv_eqns(jaxpr):
  """Every conv_general_dilated equation of a (closed) jaxpr, nested ones included."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      out.append(eqn)
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (list, tuple)) else [v]):
        if hasattr(sub, "eqns"):
          out.extend(_conv_eqns(sub))
        elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
          out.extend(_conv_eqns(sub.jaxpr))
  return out


def _loss(conv_fn, stride, kernel):
  pad = [(kernel // 2, kernel // 2)] * 2

  def f(x, w, t):
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
    y = conv_fn(x, w, (stride, stride), pad, dimension_numbers=dn)
    return jnp.sum(jnp.sin(y) * t)
  return f


@pytest.mark.parametrize("kernel,size", [(3, 28), (3, 32), (1, 14), (1, 8)])
def test_stride2_conv_subpixel_gradient_matches_xla(kernel, size):
  kx, kw, kt = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (2, size, size, 6))
  w = jax.random.normal(kw, (kernel, kernel, 6, 10)) * 0.3
  t = jax.random.normal(kt, (2, size // 2, size // 2, 10))
  ours = _loss(layers.conv_general_dilated, 2, kernel)
  xla = _loss(jax.lax.conv_general_dilated, 2, kernel)
  np.testing.assert_allclose(ours(x, w, t), xla(x, w, t), rtol=1e-6)
  for a, b in zip(jax.grad(ours, (0, 1))(x, w, t), jax.grad(xla, (0, 1))(x, w, t)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))
  # The input gradient really is the sub-pixel one on CPU: no zero-dilated convolution.
  dilated = lambda f: [e for e in _conv_eqns(jax.make_jaxpr(jax.grad(f))(x, w, t).jaxpr)
                       if tuple(e.params["lhs_dilation"]) != (1, 1)]
  assert len(dilated(xla)) == 1
  assert dilated(ours) == []


@pytest.mark.parametrize("kernel,size,stride", [(3, 14, 2), (3, 26, 2), (3, 31, 2),
                                                (1, 15, 2), (3, 28, 1)])
def test_other_convs_are_xla_own(kernel, size, stride):
  """Below the size threshold, odd sizes and stride 1: XLA's convolution and autodiff."""
  x = jnp.ones((1, size, size, 4))
  w = jnp.ones((kernel, kernel, 4, 5))
  ours = _loss(layers.conv_general_dilated, stride, kernel)
  xla = _loss(jax.lax.conv_general_dilated, stride, kernel)
  t = jnp.ones(jax.eval_shape(lambda: jax.lax.conv_general_dilated(
      x, w, (stride, stride), [(kernel // 2, kernel // 2)] * 2,
      dimension_numbers=NHWC)).shape)
  assert str(jax.make_jaxpr(jax.grad(ours))(x, w, t)) == str(jax.make_jaxpr(jax.grad(xla))(x, w, t))


def test_conv_layer_uses_it_and_keeps_its_params():
  """layers.conv: the same parameters as a plain nn.Conv, the same output."""
  import flax.linen as nn
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  ours = layers.conv(8, 3, 2, dtype=jnp.float32)
  plain = nn.Conv(8, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=False)
  v = ours.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, v) == jax.tree.map(jnp.shape, plain.init(jax.random.key(0), x))
  np.testing.assert_allclose(ours.apply(v, x), plain.apply(v, x), rtol=1e-6, atol=1e-6)


def test_spatial_max_values_and_gradient_split_among_ties():
  x = jax.random.normal(jax.random.key(0), (3, 6, 5, 4))
  x = x.at[1, 2, 3, 0].set(9.0).at[1, 4, 0, 0].set(9.0)  # a tie in (1, :, :, 0)
  x = x.at[2, :, :, 3].set(-1.5)                          # a constant channel
  g = jax.random.normal(jax.random.key(1), (3, 4))
  np.testing.assert_array_equal(cbam.spatial_max(x), jnp.max(x, axis=(1, 2)))
  ours = jax.grad(lambda x: jnp.sum(cbam.spatial_max(x) * g))(x)
  ref = jax.grad(lambda x: jnp.sum(jnp.max(x, axis=(1, 2)) * g))(x)
  np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)
  assert float(ours[1, 2, 3, 0]) == pytest.approx(float(g[1, 0]) / 2, rel=1e-6)
  assert float(ours[2, 0, 0, 3]) == pytest.approx(float(g[2, 3]) / 30, rel=1e-6)


def test_spatial_max_of_tall_maps_is_jnp_max():
  x = jax.random.normal(jax.random.key(0), (1, cbam.MAX_UNROLLED_ROWS + 2, 3, 2))
  jaxpr = str(jax.make_jaxpr(cbam.spatial_max)(x))
  assert "max" in jaxpr and jaxpr.count("slice") == 0
  np.testing.assert_array_equal(cbam.spatial_max(x), jnp.max(x, axis=(1, 2)))


def test_spatial_sum_matches_and_is_accurate():
  x = jax.random.normal(jax.random.key(0), (4, 56, 56, 8)) + 100.0
  ref = np.asarray(x, np.float64).sum(axis=(1, 2))
  got = np.asarray(cbam.spatial_sum(x))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, ref, rtol=2e-6)
