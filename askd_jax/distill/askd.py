"""A-SKD: cosine distance between the pre-sigmoid CBAM attention maps of student and teacher.

Also home of the two torch-semantics vector helpers the other methods share
(`l2_normalize` = F.normalize, `cosine_similarity` = F.cosine_similarity).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp

DEFAULTS = {"weight": 5.0}


def cfg_get(cfg: Mapping[str, Any] | None, key: str, default: Any) -> Any:
  """`cfg.get(key, default)` for dicts, ConfigDicts and None."""
  if cfg is None:
    return default
  return cfg.get(key, default)


def safe_norm(x: jax.Array, eps: float, axis: int = -1, keepdims: bool = True) -> jax.Array:
  """max(||x||, eps) with a finite gradient at x == 0 (plain sqrt gives NaN there).

  sqrt(max(sum x^2, eps^2)) has torch's clamp_min(norm, eps) forward value, and below eps
  the gradient of the norm is 0, as torch's subgradient of the norm at 0.
  """
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=keepdims)
  return jnp.sqrt(jnp.maximum(sq, eps * eps))


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """torch.nn.functional.normalize(x, p=2, dim=axis, eps)."""
  return x / safe_norm(x, eps, axis=axis)


def cosine_similarity(a: jax.Array, b: jax.Array, axis: int = -1,
                      eps: float = 1e-8) -> jax.Array:
  """torch.nn.functional.cosine_similarity: each vector divided by max(its norm, eps)."""
  return jnp.sum(l2_normalize(a, axis, eps) * l2_normalize(b, axis, eps), axis=axis)


def _flat(x: jax.Array) -> jax.Array:
  return jnp.asarray(x, jnp.float32).reshape(x.shape[0], -1)  # (B, N)


def _check_maps(name: str, s: Tuple[jax.Array, ...], t: Tuple[jax.Array, ...]) -> None:
  if len(s) != len(t):
    raise ValueError(f"askd: student has {len(s)} {name} maps but teacher has {len(t)}; "
                     "student and teacher need the same CBAM block layout.")
  for i, (a, b) in enumerate(zip(s, t)):
    if a.shape != b.shape:
      raise ValueError(f"askd: {name} map {i} has student shape {a.shape} but teacher shape "
                       f"{b.shape}; feed the student {b.shape[1:]}-compatible (upsampled) inputs.")


def askd_loss(student, teacher, labels: jax.Array,
              cfg: Mapping[str, Any] | None = None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """weight * sum over blocks and {channel, spatial} of mean_b (1 - cos(s_b, t_b))."""
  del labels
  weight = float(cfg_get(cfg, "weight", DEFAULTS["weight"]))
  _check_maps("channel", student.channel_maps, teacher.channel_maps)
  _check_maps("spatial", student.spatial_maps, teacher.spatial_maps)
  if not student.channel_maps and not student.spatial_maps:
    raise ValueError("askd: the features hold no CBAM attention maps; use a CBAM backbone.")
  t_ch = jax.lax.stop_gradient(teacher.channel_maps)
  t_sp = jax.lax.stop_gradient(teacher.spatial_maps)
  # One (B,) cosine per map; (1 - cos) averaged over the batch, summed over maps.
  cos_ch = [cosine_similarity(_flat(s), _flat(t)) for s, t in zip(student.channel_maps, t_ch)]
  cos_sp = [cosine_similarity(_flat(s), _flat(t)) for s, t in zip(student.spatial_maps, t_sp)]
  dist = sum(jnp.mean(1.0 - c) for c in cos_ch + cos_sp)
  loss = weight * dist
  metrics = {"total": loss}
  if cos_ch:
    metrics["channel_cos"] = jnp.mean(jnp.stack([jnp.mean(c) for c in cos_ch]))
  if cos_sp:
    metrics["spatial_cos"] = jnp.mean(jnp.stack([jnp.mean(c) for c in cos_sp]))
  return loss, metrics
