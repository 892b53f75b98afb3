"""Box arithmetic, x1y1x2y2 float boxes (no +1 pixel convention, as vedadet/mmdet v2).

All functions are pure jnp, broadcast over leading dimensions and are jit-safe.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp

# vedadet's TinaFace DeltaXYWHBBoxCoder.
TARGET_MEANS = (0.0, 0.0, 0.0, 0.0)
TARGET_STDS = (0.1, 0.1, 0.2, 0.2)
WH_RATIO_CLIP = 16 / 1000


def area(b: jax.Array) -> jax.Array:
  return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


def iou_matrix(a: jax.Array, b: jax.Array, eps: float = 1e-6) -> jax.Array:
  """a (N, 4), b (M, 4) -> (N, M) IoU; union clamped at eps."""
  lt = jnp.maximum(a[:, None, :2], b[None, :, :2])
  rb = jnp.minimum(a[:, None, 2:], b[None, :, 2:])
  wh = jnp.clip(rb - lt, 0.0)
  inter = wh[..., 0] * wh[..., 1]
  union = area(a)[:, None] + area(b)[None, :] - inter
  return inter / jnp.maximum(union, eps)


def iou_aligned(a: jax.Array, b: jax.Array, eps: float = 1e-6) -> jax.Array:
  """a, b (..., 4) -> (...) IoU of corresponding boxes."""
  lt = jnp.maximum(a[..., :2], b[..., :2])
  rb = jnp.minimum(a[..., 2:], b[..., 2:])
  wh = jnp.clip(rb - lt, 0.0)
  inter = wh[..., 0] * wh[..., 1]
  return inter / jnp.maximum(area(a) + area(b) - inter, eps)


def diou(pred: jax.Array, target: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Distance-IoU (Zheng et al. 2020): IoU - d^2 / c^2, (..., 4) -> (...).

  d: distance of the centres, c: diagonal of the smallest enclosing box; eps in the
  union and in c^2 as vedadet's DIoULoss.
  """
  lt = jnp.maximum(pred[..., :2], target[..., :2])
  rb = jnp.minimum(pred[..., 2:], target[..., 2:])
  wh = jnp.clip(rb - lt, 0.0)
  inter = wh[..., 0] * wh[..., 1]
  iou = inter / (area(pred) + area(target) - inter + eps)
  enc = jnp.clip(jnp.maximum(pred[..., 2:], target[..., 2:])
                 - jnp.minimum(pred[..., :2], target[..., :2]), 0.0)
  c2 = enc[..., 0] ** 2 + enc[..., 1] ** 2 + eps
  d = (target[..., :2] + target[..., 2:] - pred[..., :2] - pred[..., 2:]) / 2
  return iou - (d[..., 0] ** 2 + d[..., 1] ** 2) / c2


def _xywh(b):
  return ((b[..., 0] + b[..., 2]) * 0.5, (b[..., 1] + b[..., 3]) * 0.5,
          b[..., 2] - b[..., 0], b[..., 3] - b[..., 1])


def encode(anchors: jax.Array, gt: jax.Array, means: Sequence[float] = TARGET_MEANS,
           stds: Sequence[float] = TARGET_STDS) -> jax.Array:
  """Deltas (dx, dy, dw, dh) that move anchors onto gt, normalised by means/stds."""
  px, py, pw, ph = _xywh(anchors)
  gx, gy, gw, gh = _xywh(gt)
  d = jnp.stack([(gx - px) / pw, (gy - py) / ph, jnp.log(gw / pw), jnp.log(gh / ph)], -1)
  return (d - jnp.asarray(means, d.dtype)) / jnp.asarray(stds, d.dtype)


def decode(anchors: jax.Array, deltas: jax.Array, means: Sequence[float] = TARGET_MEANS,
           stds: Sequence[float] = TARGET_STDS, max_shape: Tuple[int, int] | None = None,
           wh_ratio_clip: float = WH_RATIO_CLIP) -> jax.Array:
  """Inverse of encode; dw, dh clamped to |log(wh_ratio_clip)|; optional clip to (H, W)."""
  d = deltas * jnp.asarray(stds, deltas.dtype) + jnp.asarray(means, deltas.dtype)
  lim = abs(math.log(wh_ratio_clip))
  dw = jnp.clip(d[..., 2], -lim, lim)
  dh = jnp.clip(d[..., 3], -lim, lim)
  px, py, pw, ph = _xywh(anchors)
  gx, gy = px + pw * d[..., 0], py + ph * d[..., 1]
  gw, gh = pw * jnp.exp(dw), ph * jnp.exp(dh)
  out = jnp.stack([gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5], -1)
  if max_shape is not None:
    h, w = max_shape
    out = jnp.clip(out, 0.0, jnp.asarray([w, h, w, h], out.dtype))
  return out
