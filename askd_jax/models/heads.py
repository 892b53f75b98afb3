"""Margin heads (ArcFace, CosFace) and the backbone + head wrapper."""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import linen as nn


def _normalize(x, axis=-1, eps=1e-12):
  # torch.nn.functional.normalize: x / max(||x||, eps)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


class _CosineHead(nn.Module):
  num_classes: int

  def cosine(self, emb):
    # Weight stored (classes, D) as in the official ArcMarginProduct.
    w = self.param("kernel", nn.initializers.xavier_uniform(), (self.num_classes, emb.shape[-1]),
                   jnp.float32)
    return _normalize(emb.astype(jnp.float32)) @ _normalize(w).T  # (B, classes), float32


class ArcFace(_CosineHead):
  """ArcFace: s * cos(theta + m) on the target, s * cos(theta) elsewhere (official branch)."""
  s: float = 32.0
  m: float = 0.5
  easy_margin: bool = False

  @nn.compact
  def __call__(self, emb, labels):
    cos = self.cosine(emb)
    sin = jnp.sqrt(jnp.maximum(1.0 - cos * cos, 1e-12))
    phi = cos * math.cos(self.m) - sin * math.sin(self.m)
    if self.easy_margin:
      phi = jnp.where(cos > 0, phi, cos)
    else:
      phi = jnp.where(cos - math.cos(math.pi - self.m) > 0, phi,
                      cos - math.sin(math.pi - self.m) * self.m)
    onehot = jax.nn.one_hot(labels, self.num_classes, dtype=cos.dtype)
    return self.s * (onehot * phi + (1.0 - onehot) * cos)


class CosFace(_CosineHead):
  """CosFace (LMCL): s * (cos(theta) - m) on the target."""
  s: float = 64.0
  m: float = 0.35

  @nn.compact
  def __call__(self, emb, labels):
    cos = self.cosine(emb)
    return self.s * (cos - self.m * jax.nn.one_hot(labels, self.num_classes, dtype=cos.dtype))


class MarginModel(nn.Module):
  """Backbone + margin head. __call__(x, labels=None, train) -> (outputs, Features).

  outputs: {'embedding': (B, D)} and, when labels are given, {'logits': (B, classes)}.
  A frozen teacher is called without labels, so its head is never evaluated.
  `bgr=True` (a checkpoint converted with --channel_order=bgr) reverses the RGB input.
  """
  backbone: nn.Module
  head: Optional[nn.Module] = None
  bgr: bool = False

  def __call__(self, x, labels=None, train: bool = False):
    if self.bgr:
      x = x[..., ::-1]
    emb, feats = self.backbone(x, train=train)
    out = {"embedding": emb}
    if labels is not None and self.head is not None:
      out["logits"] = self.head(emb, labels)
    return out, feats


def make_margin(name: str, num_classes: int, s: float, m: float) -> nn.Module:
  heads = {"arcface": ArcFace, "cosface": CosFace}
  if name not in heads:
    raise ValueError(f"margin={name!r} is unknown; choose one of {sorted(heads)}")
  return heads[name](num_classes=num_classes, s=s, m=m)
