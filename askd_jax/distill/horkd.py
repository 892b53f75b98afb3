"""HORKD (Ge et al., AAAI 2020) on the penultimate embeddings.

L = weight * (individual * L1 + pair * L2 + triplet * L3 + group * LC), weights 1, 0.1, 0.2, 0.1.
  L1: MSE between embeddings (mean over B*D, as F-KD).
  L2: RKD distance loss (Park et al. 2019): pairwise Euclidean distances, each matrix
      divided by the mean of its non-zero entries, smooth-L1 (delta 1), mean reduction.
  L3: RKD angle loss: cosines of the angle at j of every triplet (i, j, k), smooth-L1, mean.
  LC: group level; HORKD has no public code, so this project defines it (docs/distillation.md):
      each sample's softmax over cosine similarities to the in-batch class centres
      (temperature tau), teacher vs student, KL(p_t || p_s) averaged over samples.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp

from askd_jax.distill.askd import cfg_get, l2_normalize, safe_norm

DEFAULTS = {"weight": 1.0, "individual": 1.0, "pair": 0.1, "triplet": 0.2, "group": 0.1,
            "temperature": 0.1}


def smooth_l1(a: jax.Array, b: jax.Array) -> jax.Array:
  """torch F.smooth_l1_loss(a, b) with beta 1 and mean reduction."""
  d = jnp.abs(a - b)
  return jnp.mean(jnp.where(d < 1.0, 0.5 * d * d, d - 0.5))


def pairwise_distance(e: jax.Array, eps: float = 1e-12) -> jax.Array:
  """e: (B, D) -> (B, B) Euclidean distances, 0 on the diagonal (RKD's `pdist`)."""
  sq = jnp.sum(jnp.square(e), axis=1)
  d2 = sq[:, None] + sq[None, :] - 2.0 * (e @ e.T)
  d = jnp.sqrt(jnp.maximum(d2, eps))  # clamp keeps sqrt's gradient finite
  return jnp.where(jnp.eye(e.shape[0], dtype=bool), 0.0, d)


def normalized_distance(e: jax.Array) -> jax.Array:
  d = pairwise_distance(e)
  pos = d > 0
  mean = jnp.sum(jnp.where(pos, d, 0.0)) / jnp.maximum(jnp.sum(pos), 1)
  return d / jnp.maximum(mean, 1e-12)


def rkd_distance(s: jax.Array, t: jax.Array) -> jax.Array:
  return smooth_l1(normalized_distance(s), normalized_distance(t))


def triplet_angles(e: jax.Array, eps: float = 1e-12) -> jax.Array:
  """e: (B, D) -> (B, B, B): cos of the angle at j between e_i - e_j and e_k - e_j."""
  diff = e[None, :, :] - e[:, None, :]  # diff[j, i] = e_i - e_j: (B, B, D)
  sq = jnp.sum(jnp.square(diff), axis=-1, keepdims=True)
  # F.normalize gives 0 for a zero difference (i == j). Masking with where instead of
  # dividing by eps keeps a ~1/eps gradient from entering the diagonal, where it would
  # cancel only up to float rounding.
  unit = jnp.where(sq > 0, diff / safe_norm(diff, eps), 0.0)
  return jnp.einsum("jid,jkd->jik", unit, unit)


def rkd_angle(s: jax.Array, t: jax.Array) -> jax.Array:
  return smooth_l1(triplet_angles(s), triplet_angles(t))


def class_centre_logprobs(e: jax.Array, labels: jax.Array, temperature: float) -> jax.Array:
  """log softmax over in-batch class centres of cos(e_i, centre_c) / temperature.

  Returns (log_p (B, B), first (B,)): column c stands for the class of sample c; only the
  first sample of each class (`first`) holds a centre, the other columns are masked to
  -1e9, so each class counts once. Shapes stay static under jit whatever the labels.
  """
  b = e.shape[0]
  u = l2_normalize(e, axis=-1, eps=1e-12)  # (B, D)
  same = (labels[:, None] == labels[None, :]).astype(jnp.float32)  # (B, B)
  centres = (same @ u) / jnp.sum(same, axis=1, keepdims=True)  # centre of sample c's class
  sims = u @ l2_normalize(centres, axis=-1, eps=1e-12).T  # (B, B)
  earlier = jnp.tril(jnp.ones((b, b), jnp.float32), k=-1)  # earlier[c, k] = k < c
  first = jnp.sum(same * earlier, axis=1) == 0  # (B,) first occurrence of its class
  logits = jnp.where(first[None, :], sims / temperature, -1e9)
  return jax.nn.log_softmax(logits, axis=-1), first


def group_loss(s: jax.Array, t: jax.Array, labels: jax.Array,
               temperature: float = 0.1) -> jax.Array:
  """mean_i KL(p_t(i) || p_s(i)) over the in-batch class centres."""
  log_ps, first = class_centre_logprobs(s, labels, temperature)
  log_pt, _ = class_centre_logprobs(t, labels, temperature)
  kl = jnp.where(first[None, :], jnp.exp(log_pt) * (log_pt - log_ps), 0.0)
  return jnp.mean(jnp.sum(kl, axis=-1))


def horkd_loss(student, teacher, labels: jax.Array,
               cfg: Mapping[str, Any] | None = None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  w = {k: float(cfg_get(cfg, k, v)) for k, v in DEFAULTS.items()}
  s = jnp.asarray(student.embedding, jnp.float32)  # (B, D)
  t = jax.lax.stop_gradient(jnp.asarray(teacher.embedding, jnp.float32))
  if s.shape != t.shape:
    raise ValueError(f"horkd: student embedding {s.shape} != teacher embedding {t.shape}; "
                     "HORKD needs the same embedding size.")
  labels = jnp.asarray(labels).reshape(-1)
  if labels.shape[0] != s.shape[0]:
    raise ValueError(f"horkd: {labels.shape[0]} labels for a batch of {s.shape[0]}.")
  l1 = jnp.mean(jnp.square(s - t))
  l2 = rkd_distance(s, t)
  l3 = rkd_angle(s, t)
  lc = group_loss(s, t, labels, w["temperature"])
  loss = w["weight"] * (w["individual"] * l1 + w["pair"] * l2 + w["triplet"] * l3
                        + w["group"] * lc)
  return loss, {"total": loss, "individual": l1, "pair": l2, "triplet": l3, "group": lc}
