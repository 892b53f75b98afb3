"""Attention transfer (Zagoruyko & Komodakis 2017) on the four stage outputs.

at(x) = F.normalize(mean_c x^2 flattened over H*W); per stage mean((at(s) - at(t))^2) over
all B*H*W elements; loss = beta * sum over stages (official attention-transfer code).

The map's two sums (over channels, then over positions for the norm) and the sum in its
gradient are fixed pairwise trees of elementwise adds (`_tree_sum`), not XLA reductions:
XLA's reduce vectorises over the kept axes, so its rounding changed with the batch size, and
a batch split over 4 devices gave maps ~1e-7 apart from one device's, which AT's weight of
1000 amplified to 1.26e-4 in the parameters after 3 steps (tests/test_sharding.py). With the
trees a sample's map and its gradient are bit for bit the same in any batch
(tests/test_distill.py), and AT agrees across layouts as A-SKD does (2.9e-6).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp

from askd_jax.distill.askd import cfg_get

DEFAULTS = {"weight": 1e3}
EPS = 1e-12  # F.normalize's


def _tree_sum(x: jax.Array) -> jax.Array:
  """Sum over the last axis as a fixed pairwise tree of elementwise adds (odd lengths padded
  with an exact 0): the same rounding whatever the sizes of the other axes."""
  n = x.shape[-1]
  while n > 1:
    if n % 2:
      x = jnp.concatenate([x, jnp.zeros(x.shape[:-1] + (1,), x.dtype)], axis=-1)
      n += 1
    x = x[..., :n // 2] + x[..., n // 2:]
    n //= 2
  return x[..., 0]


def _map_and_norm(x: jax.Array):
  x = jnp.asarray(x, jnp.float32)
  v = (_tree_sum(jnp.square(x)) / x.shape[-1]).reshape(x.shape[0], -1)  # mean_c x^2: (B, HW)
  n = jnp.sqrt(_tree_sum(jnp.square(v)))[:, None]
  return v, n


@jax.custom_vjp
def attention_map(x: jax.Array) -> jax.Array:
  """x: (B, H, W, C) -> (B, H*W): F.normalize(mean_c x^2), unit L2 norm per sample."""
  v, n = _map_and_norm(x)
  return v / jnp.maximum(n, EPS)


def _map_fwd(x):
  v, n = _map_and_norm(x)
  return v / jnp.maximum(n, EPS), (x, v, n)


def _map_bwd(res, g):
  x, v, n = res
  d = jnp.maximum(n, EPS)
  out = v / d
  # d(v / max(|v|, eps)) / dv: (g - out <out, g>) / |v|, or g / eps where the norm is clamped
  gv = jnp.where(n >= EPS, (g - out * _tree_sum(g * out)[:, None]) / d, g / d)
  xf = jnp.asarray(x, jnp.float32)
  gx = gv.reshape(x.shape[:-1])[..., None] * (2.0 / x.shape[-1]) * xf
  return (gx.astype(x.dtype),)


attention_map.defvjp(_map_fwd, _map_bwd)


def at_loss(student, teacher, labels: jax.Array,
            cfg: Mapping[str, Any] | None = None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  del labels
  # `beta` is the paper's name; `weight` the common one. `weight` wins when both are set.
  beta = float(cfg_get(cfg, "weight", cfg_get(cfg, "beta", DEFAULTS["weight"])))
  if len(student.stages) != len(teacher.stages):
    raise ValueError(f"at: student has {len(student.stages)} stages, teacher "
                     f"{len(teacher.stages)}; AT pairs stages one to one.")
  terms = []
  for i, (s, t) in enumerate(zip(student.stages, teacher.stages)):
    if s.shape[:3] != t.shape[:3]:
      raise ValueError(f"at: stage {i} student {s.shape[:3]} vs teacher {t.shape[:3]} "
                       "(B, H, W) differ; AT needs equal spatial sizes.")
    t = jax.lax.stop_gradient(t)
    terms.append(jnp.mean(jnp.square(attention_map(s) - attention_map(t))))
  per_stage = jnp.stack(terms)
  loss = beta * jnp.sum(per_stage)
  metrics = {"total": loss}
  metrics.update({f"stage{i + 1}": v for i, v in enumerate(terms)})
  return loss, metrics
