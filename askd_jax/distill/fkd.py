"""F-KD (Massoli et al. 2020): MSE between student and teacher penultimate embeddings.

Reduction as the official code's `F.mse_loss(student, teacher)`: mean over all B*D elements.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp

from askd_jax.distill.askd import cfg_get

DEFAULTS = {"weight": 1.0}


def fkd_loss(student, teacher, labels: jax.Array,
             cfg: Mapping[str, Any] | None = None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  del labels
  weight = float(cfg_get(cfg, "weight", DEFAULTS["weight"]))
  s = jnp.asarray(student.embedding, jnp.float32)  # (B, D)
  t = jax.lax.stop_gradient(jnp.asarray(teacher.embedding, jnp.float32))
  if s.shape != t.shape:
    raise ValueError(f"fkd: student embedding {s.shape} != teacher embedding {t.shape}; "
                     "F-KD needs the same embedding size.")
  mse = jnp.mean(jnp.square(s - t))
  loss = weight * mse
  return loss, {"total": loss, "mse": mse}
