"""Attention transfer (Zagoruyko & Komodakis 2017) on the four stage outputs.

at(x) = F.normalize(mean_c x^2 flattened over H*W); per stage mean((at(s) - at(t))^2) over
all B*H*W elements; loss = beta * sum over stages (official attention-transfer code).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp

from askd_jax.distill.askd import cfg_get, l2_normalize

DEFAULTS = {"weight": 1e3}


def attention_map(x: jax.Array) -> jax.Array:
  """x: (B, H, W, C) -> (B, H*W), unit L2 norm per sample."""
  x = jnp.asarray(x, jnp.float32)
  a = jnp.mean(jnp.square(x), axis=-1).reshape(x.shape[0], -1)
  return l2_normalize(a, axis=-1, eps=1e-12)


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
