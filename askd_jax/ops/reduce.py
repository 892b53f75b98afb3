"""Sums and maxima over the batch and spatial axes of NHWC arrays, and squared norms.

XLA:CPU runs a reduction over the leading (batch, spatial) axes of an NHWC array, the
reduce-window tree its tree-reduction pass splits it into, or a full reduction, several
times slower than a GEMV or a reduction whose outputs are contiguous; BN statistics were
half of the CPU train step (docs/benchmarks.md). Elsewhere (`cpu=False`) these are the plain
reductions.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import optax


def channel_sum(x: jax.Array, *, cpu: bool) -> jax.Array:
  """(B, ..., C) -> (C,) float32 sums over every axis but the last (see `channel_sums`)."""
  return channel_sums(x, cpu=cpu)[0]


def channel_sums(*xs: jax.Array, cpu: bool) -> tuple[jax.Array, ...]:
  """Per-channel float32 sums of same-shaped (B, ..., C) arrays, one pass over all of them.

  On CPU: one variadic reduction over (up to 32) images, into which XLA fuses the arrays'
  producers (a product such as x * x or dy * x is never written out), then a GEMV over the
  first spatial axis and a small sum over the rest. Measured: sum(x * x) of a
  32x112x112x64 batch 23 -> 7 ms with XLA:CPU's column reduction; the rounding stays near
  float32's (~2e-7 relative on that batch)."""
  if not cpu:
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


def _add_pairwise(a, b):
  return [u + v for u, v in zip(a, b)]


def square_sum(x: jax.Array, *, cpu: bool) -> jax.Array:
  """float32 sum of x * x over every element (a gradient's squared norm).

  On CPU through `channel_sums` over a (rows, gcd(size, 4096)) view of the flat array:
  XLA:CPU's own full reduction runs as a reduce-window tree several times slower (the
  squared norm of the iResNet50 gradients, 57M values: 78-114 ms -> 15 ms)."""
  x = x.astype(jnp.float32).reshape(-1)
  if not cpu or x.size < 8192:
    return jnp.sum(x * x)
  v = x.reshape(-1, math.gcd(x.size, 4096))
  return jnp.sum(channel_sum(v * v, cpu=True))


def global_norm(tree, *, cpu: bool) -> jax.Array:
  """The global L2 norm of a tree of arrays (`optax.tree.norm`), float32; on CPU each
  leaf's squared norm is `square_sum` (the reason there)."""
  leaves = jax.tree.leaves(tree)
  if not cpu or not leaves:
    return optax.tree.norm(tree)
  return jnp.sqrt(sum(square_sum(g, cpu=True) for g in leaves))


def spatial_sum(x: jax.Array, *, cpu: bool) -> jax.Array:
  """(B, H, W, C) -> (B, C) float32 sums over H, W.

  On CPU a batched GEMV, ones(B, 1, HW) @ x(B, HW, C), whose operands are in XLA's canonical
  dot layout as they are: XLA:CPU runs the reduction over the middle axes several times
  slower, and a contraction written as "bnc,n->bc" makes it transpose x to (B, C, HW)
  first, recomputing x's producers inside that copy (32x56x56x64: 9.7 -> 6.6 ms)."""
  b, c = x.shape[0], x.shape[-1]
  if cpu:
    ones = jnp.ones((b, 1, x.shape[1] * x.shape[2]), x.dtype)
    return jnp.einsum("bkn,bnc->bkc", ones, x.reshape(b, -1, c),
                      precision=jax.lax.Precision.HIGHEST,
                      preferred_element_type=jnp.float32)[:, 0]
  return jnp.sum(x.astype(jnp.float32), axis=(1, 2))


MAX_UNROLLED_ROWS = 64  # larger maps (detection) keep jnp.max: one HLO op per row


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def spatial_max(x: jax.Array, cpu: bool) -> jax.Array:
  """(B, H, W, C) -> (B, C) maxima over H, W, with jnp.max's gradient (split among ties).

  On CPU (up to MAX_UNROLLED_ROWS rows) the maximum over H runs as one elementwise pass
  that reads the channels contiguously, then a small reduction over W: XLA:CPU would
  otherwise copy x to (B, C, HW) for a row reduction, recomputing x's producers inside
  that copy (32x56x56x64: 13.9 -> 5.0 ms). The backward is one masked pass; the tie count
  is a GEMV (`spatial_sum`)."""
  if not cpu or x.shape[1] > MAX_UNROLLED_ROWS:
    return jnp.max(x, axis=(1, 2))
  m = x[:, 0]
  for h in range(1, x.shape[1]):
    m = jnp.maximum(m, x[:, h])
  # A reduction, not another unrolled loop: its result is materialised once instead of
  # being recomputed inside every elementwise consumer.
  return jnp.max(m, axis=1)


def _spatial_max_fwd(x, cpu):
  m = spatial_max(x, cpu)
  return m, (x, m)


def _spatial_max_bwd(cpu, res, g):
  x, m = res
  hit = x == m[:, None, None, :]
  count = spatial_sum(hit.astype(x.dtype), cpu=cpu)
  share = (g.astype(jnp.float32) / count).astype(x.dtype)
  return (jnp.where(hit, share[:, None, None, :], jnp.zeros((), x.dtype)),)


spatial_max.defvjp(_spatial_max_fwd, _spatial_max_bwd)
