"""askd_jax.ops (the XLA:CPU formulations, `cpu=True`) against XLA's plain ops (what `cpu=False`
gives): values, gradients, HLO."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from askd_jax import ops
from askd_jax.ops import conv as ops_conv
from askd_jax.ops.reduce import MAX_UNROLLED_ROWS

NHWC = ("NHWC", "HWIO", "NHWC")
cpu_conv = functools.partial(ops.conv_general_dilated, cpu=True)


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
  ours = _loss(cpu_conv, 2, kernel)
  xla = _loss(jax.lax.conv_general_dilated, 2, kernel)
  np.testing.assert_allclose(ours(x, w, t), xla(x, w, t), rtol=1e-6)
  for a, b in zip(jax.grad(ours, (0, 1))(x, w, t), jax.grad(xla, (0, 1))(x, w, t)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))
  # The input gradient really is the sub-pixel one on CPU: no zero-dilated convolution.
  dilated = lambda f: [e for e in _conv_eqns(jax.make_jaxpr(jax.grad(f))(x, w, t).jaxpr)
                       if tuple(e.params["lhs_dilation"]) != (1, 1)]
  assert len(dilated(xla)) == 1
  assert dilated(ours) == []


@pytest.mark.parametrize("kernel,size,stride,cin", [(3, 14, 2, 4), (3, 26, 2, 4), (3, 31, 2, 4),
                                                    (1, 15, 2, 4), (3, 28, 1, 4), (3, 9, 1, 3),
                                                    (7, 12, 1, 2), (1, 6, 1, 4)])
def test_every_nhwc_conv_has_xla_values_and_gradients(kernel, size, stride, cin):
  """Stride 1 and 2, odd sizes, the stem's 3 channels, CBAM's 7x7 spatial conv: the CPU
  backward (kernel gradient from materialised transposes, XLA's input gradient where it
  is not sub-pixel) gives XLA's numbers."""
  kx, kw, kt = jax.random.split(jax.random.key(2), 3)
  x = jax.random.normal(kx, (3, size, size, cin))
  w = jax.random.normal(kw, (kernel, kernel, cin, 5)) * 0.3
  ours = _loss(cpu_conv, stride, kernel)
  xla = _loss(jax.lax.conv_general_dilated, stride, kernel)
  t = jax.random.normal(kt, jax.eval_shape(lambda: jax.lax.conv_general_dilated(
      x, w, (stride, stride), [(kernel // 2, kernel // 2)] * 2, dimension_numbers=NHWC)).shape)
  np.testing.assert_allclose(ours(x, w, t), xla(x, w, t), rtol=1e-6)
  for a, b in zip(jax.jit(jax.grad(ours, (0, 1)))(x, w, t), jax.jit(jax.grad(xla, (0, 1)))(x, w, t)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_bfloat16_conv_gradients_keep_their_dtype_and_values():
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 8)).astype(jnp.bfloat16)
  w = (jax.random.normal(jax.random.key(1), (3, 3, 8, 8)) * 0.2).astype(jnp.bfloat16)
  ours, xla = _loss(cpu_conv, 1, 3), _loss(jax.lax.conv_general_dilated, 1, 3)
  t = jnp.ones((2, 16, 16, 8), jnp.bfloat16)
  for a, b in zip(jax.grad(ours, (0, 1))(x, w, t), jax.grad(xla, (0, 1))(x, w, t)):
    assert a.dtype == b.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=2e-2, atol=2e-2 * float(jnp.max(jnp.abs(b))))


def test_other_convs_are_xla_own():
  """NCHW, string padding, groups: XLA's convolution and autodiff, untouched; with
  cpu=False every convolution is (the NHWC one of the models too)."""
  x = jnp.ones((1, 4, 10, 10))
  w = jnp.ones((5, 4, 3, 3))
  jaxpr = lambda f, *a: str(jax.make_jaxpr(jax.grad(f, (0, 1)))(*a))
  for kw in [dict(padding=[(1, 1)] * 2, dimension_numbers=("NCHW", "OIHW", "NCHW")),
             dict(padding="SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))]:
    f = lambda fn: lambda x, w: jnp.sum(fn(x, w, (1, 1), **kw) ** 2)
    assert jaxpr(f(cpu_conv), x, w) == jaxpr(f(jax.lax.conv_general_dilated), x, w)
  xg, wg = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 2, 6))
  g = lambda fn: lambda x, w: jnp.sum(fn(x, w, (1, 1), [(1, 1)] * 2, dimension_numbers=NHWC,
                                         feature_group_count=2) ** 2)
  assert jaxpr(g(cpu_conv), xg, wg) == jaxpr(g(jax.lax.conv_general_dilated), xg, wg)
  xn, wn, t = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 6)), jnp.ones((2, 4, 4, 6))
  plain = functools.partial(ops.conv_general_dilated, cpu=False)
  assert (jaxpr(_loss(plain, 2, 3), xn, wn, t)
          == jaxpr(_loss(jax.lax.conv_general_dilated, 2, 3), xn, wn, t)
          != jaxpr(_loss(cpu_conv, 2, 3), xn, wn, t))


def _fusions_transposing_arithmetic(hlo: str) -> list[str]:
  """Names of the fused computations that change a layout and do arithmetic besides."""
  out = []
  for comp in hlo.split("\n}"):
    lines = comp.strip().splitlines()
    if not lines or not lines[0].startswith("%fused") and not lines[0].startswith("%wrapped"):
      continue
    ops = " ".join(lines[1:])
    if " transpose(" in ops and any(f" {op}(" in ops for op in ("multiply", "add", "subtract")):
      out.append(lines[0].split()[0])
  return out


def test_kernel_gradient_transposes_materialised_arrays(monkeypatch):
  """The layout changes of the kernel gradient copy arrays that exist: XLA:CPU does not
  fuse the BN in front of the convolution into them (which makes the copy ~3.5x slower)."""
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 8))
  s, b = jnp.full((8,), 1.5), jnp.full((8,), 0.1)
  w = jax.random.normal(jax.random.key(1), (3, 3, 8, 8))

  def grad_hlo():
    f = lambda w, x: jnp.sum(jnp.sin(cpu_conv(
        x * s + b, w, (1, 1), [(1, 1)] * 2, dimension_numbers=NHWC)))
    return jax.jit(jax.grad(f)).lower(w, x).compile().as_text()
  assert _fusions_transposing_arithmetic(grad_hlo()) == []
  # Without the fusion region XLA fuses the multiply-add into the transpose: the check
  # above can fail.
  monkeypatch.setattr(ops_conv, "fusion_region", lambda fn, *args, cpu, probe=None: fn(*args))
  assert _fusions_transposing_arithmetic(grad_hlo()) != []


def test_kernel_gradient_reaches_the_optimizer_in_its_layout(monkeypatch):
  """The kernel gradient leaves `kernel_grad` materialised in the kernel's layout: the
  optimizer's updates (several consumers, as in the train step) read it as it is instead
  of each fusing the layout change of the convolution's result into its arithmetic."""
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 8))
  w = jax.random.normal(jax.random.key(1), (3, 3, 8, 16))
  m = jnp.zeros_like(w)

  def update_hlo():
    def sgd(w, m, x):
      dw = jax.grad(lambda w: jnp.sum(jnp.sin(cpu_conv(
          x, w, (1, 1), [(1, 1)] * 2, dimension_numbers=NHWC))))(w)
      m_new = 0.9 * m + dw + 5e-4 * w
      return w - 0.1 * (dw + 5e-4 * w + 0.9 * m_new), m_new, jnp.sum(dw * dw)
    return jax.jit(sgd).lower(w, m, x).compile().as_text()
  assert _fusions_transposing_arithmetic(update_hlo()) == []
  real = ops_conv.fusion_region
  # Only the result's region replaced by a plain call: the updates transpose it again.
  monkeypatch.setattr(ops_conv, "fusion_region", lambda fn, *args, cpu, probe=None: (
      fn(*args) if args[0].shape[0] == w.shape[2] and args[0].ndim == 4
      and args[0].shape[1:3] == w.shape[:2] else real(fn, *args, cpu=cpu, probe=probe)))
  assert _fusions_transposing_arithmetic(update_hlo()) != []


@pytest.mark.parametrize("cpu", [True, False])
def test_fusion_region_is_fn_whatever_the_probe(cpu):
  f = lambda a, b: (a * 2.0 + b, jnp.sum(b))
  a, b = jnp.arange(6.0).reshape(2, 3), jnp.ones((3,))
  for a_ in (a, a.at[0, 0].set(jnp.nan)):  # a NaN first element takes the other branch
    got, want = ops.fusion_region(f, a_, b, cpu=cpu), f(a_, b)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
  jaxpr = str(jax.make_jaxpr(lambda a, b: ops.fusion_region(f, a, b, cpu=cpu))(a, b))
  assert ("cond" in jaxpr) == cpu


@pytest.mark.parametrize("cpu", [True, False])
@pytest.mark.parametrize("shape", [(32, 14, 14, 8), (37, 16), (6, 5, 3), (64, 4, 4, 4, 3),
                                   (1, 2, 2, 5)])
def test_channel_sums_are_accurate_sums(shape, cpu):
  rng = np.random.default_rng(0)
  x = (rng.standard_normal(shape) * 2 + 3).astype(np.float32)
  y = rng.standard_normal(shape).astype(np.float32)
  sx, sxy = jax.jit(lambda x, y: ops.channel_sums(x, x * y, cpu=cpu))(x, y)
  assert sx.shape == sxy.shape == (shape[-1],) and sx.dtype == jnp.float32
  for got, ref in [(sx, x.astype(np.float64)), (sxy, x.astype(np.float64) * y)]:
    ref = ref.reshape(-1, shape[-1]).sum(0)
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=0,
                               atol=1e-6 * np.abs(ref).max())
  np.testing.assert_allclose(ops.channel_sum(x, cpu=cpu), sx, rtol=1e-6)
  reduce_ops = str(jax.make_jaxpr(lambda x: ops.channel_sums(x, cpu=cpu))(x))
  assert ("dot_general" in reduce_ops) == cpu  # the CPU form's GEMV


@pytest.mark.parametrize("cpu", [True, False])
@pytest.mark.parametrize("shape", [(3, 3, 64, 128), (10572, 512), (3, 3, 3, 64), (8209,),
                                   (100, 7), (4,)])
def test_square_sum_is_an_accurate_squared_norm(shape, cpu):
  """Powers of two, an odd class count, a prime size (no power-of-two view), small sizes."""
  x = (np.random.default_rng(1).standard_normal(shape) * 3 + 1).astype(np.float32)
  got = jax.jit(functools.partial(ops.square_sum, cpu=cpu))(x)
  ref = np.sum(x.astype(np.float64) ** 2)
  assert got.dtype == jnp.float32 and got.shape == ()
  np.testing.assert_allclose(float(got), ref, rtol=2e-6)


@pytest.mark.parametrize("cpu", [True, False])
def test_global_norm_equals_optax_tree_norm(cpu):
  import optax
  # the train step's grad_norm metric and finite-step guard
  grad_norm = functools.partial(ops.global_norm, cpu=cpu)
  rng = np.random.default_rng(2)
  tree = {"conv": rng.standard_normal((3, 3, 32, 64)).astype(np.float32),
          "head": {"w": rng.standard_normal((1000, 128)).astype(np.float32),
                   "b": jnp.asarray(rng.standard_normal(128), jnp.bfloat16)},
          "alpha": np.full(64, 0.25, np.float32)}
  got = jax.jit(grad_norm)(tree)
  ref = np.sqrt(sum(np.sum(np.asarray(v, np.float64) ** 2) for v in jax.tree.leaves(tree)))
  np.testing.assert_allclose(float(got), ref, rtol=2e-6)
  np.testing.assert_allclose(float(got), float(optax.tree.norm(tree)), rtol=2e-6)
  assert float(grad_norm({})) == 0.0
  assert not np.isfinite(float(jax.jit(grad_norm)(dict(tree, conv=tree["conv"] * np.inf))))


@pytest.mark.parametrize("cpu", [True, False])
def test_spatial_max_values_and_gradient_split_among_ties(cpu):
  x = jax.random.normal(jax.random.key(0), (3, 6, 5, 4))
  x = x.at[1, 2, 3, 0].set(9.0).at[1, 4, 0, 0].set(9.0)  # a tie in (1, :, :, 0)
  x = x.at[2, :, :, 3].set(-1.5)                          # a constant channel
  g = jax.random.normal(jax.random.key(1), (3, 4))
  np.testing.assert_array_equal(ops.spatial_max(x, cpu=cpu), jnp.max(x, axis=(1, 2)))
  ours = jax.grad(lambda x: jnp.sum(ops.spatial_max(x, cpu=cpu) * g))(x)
  ref = jax.grad(lambda x: jnp.sum(jnp.max(x, axis=(1, 2)) * g))(x)
  np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)
  assert float(ours[1, 2, 3, 0]) == pytest.approx(float(g[1, 0]) / 2, rel=1e-6)
  assert float(ours[2, 0, 0, 3]) == pytest.approx(float(g[2, 3]) / 30, rel=1e-6)


def test_spatial_max_of_tall_maps_is_jnp_max():
  x = jax.random.normal(jax.random.key(0), (1, MAX_UNROLLED_ROWS + 2, 3, 2))
  jaxpr = str(jax.make_jaxpr(lambda x: ops.spatial_max(x, cpu=True))(x))
  assert "max" in jaxpr and jaxpr.count("slice") == 0
  np.testing.assert_array_equal(ops.spatial_max(x, cpu=True), jnp.max(x, axis=(1, 2)))
  small = x[:, :6]  # the unrolled CPU form: one slice per row
  assert str(jax.make_jaxpr(lambda x: ops.spatial_max(x, cpu=True))(small)).count("slice") == 6


@pytest.mark.parametrize("cpu", [True, False])
def test_spatial_sum_matches_and_is_accurate(cpu):
  x = jax.random.normal(jax.random.key(0), (4, 56, 56, 8)) + 100.0
  ref = np.asarray(x, np.float64).sum(axis=(1, 2))
  got = np.asarray(ops.spatial_sum(x, cpu=cpu))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, ref, rtol=2e-6)


def test_the_platform_is_decided_in_one_place():
  """`ops.on_cpu` maps a platform to the choice (the mesh's in the train loop, else JAX's
  default backend); the task puts it in the model's `cpu_ops` field. models/ and ops/ never
  ask JAX or `on_cpu` themselves: each op takes `cpu` from its caller."""
  import pathlib
  from askd_jax.train.step import CPU_COMPILER_OPTIONS, compiler_options
  assert ops.on_cpu("cpu") and not ops.on_cpu("gpu") and not ops.on_cpu("tpu")
  assert ops.on_cpu() == (jax.default_backend() == "cpu")
  assert compiler_options("cpu") == CPU_COMPILER_OPTIONS and compiler_options("gpu") == {}
  root = pathlib.Path(ops.__file__).parents[1]
  askers = sorted(str(p.relative_to(root)) for p in root.rglob("*.py")
                  if p.parts[-2] in ("models", "train", "ops") and "default_backend" in p.read_text())
  assert askers == ["ops/platform.py"], askers
  assert [p.name for p in (root / "models").glob("*.py") if "on_cpu" in p.read_text()] == []
  import inspect
  for name in set(ops.__all__) - {"on_cpu", "kernel_grad", "subpixel_input_grad"}:  # CPU-only
    assert "cpu" in inspect.signature(getattr(ops, name)).parameters, name
