"""Inference: decode, IoU-aware score, threshold, greedy NMS; jit-able, fixed shapes.

As vedadet's IoUBBoxAnchorConverter + multiclass NMS for one class:
  score = sigmoid(cls)^(2 alpha) * sigmoid(iou)^(2 (1 - alpha)), alpha = 0.4
  (alpha = 0.5 gives cls * iou); boxes decoded and clipped to the input; boxes with
  sqrt(area) < min_size (input pixels) dropped; kept if score > score_thr; greedy NMS suppresses
  IoU > nms_iou. The paper's values: score_thr 0.02, nms_iou 0.4 (vedadet's config 0.01,
  0.45). vedadet also drops boxes shorter than 9 px in original-image pixels
  (`min_height`, applied after dividing by `scale`).
Static shapes: the pre_nms_topk best-scoring anchors enter NMS; at most max_det boxes come
out per image, padded, with a validity mask, sorted by score.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import jax
import jax.numpy as jnp

from askd_jax.detection import boxes as B


def nms(boxes: jax.Array, scores: jax.Array, valid: jax.Array, iou_thr: float,
        max_det: int) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Greedy NMS for one image: boxes (K, 4), scores (K,), valid (K,) bool.

  Returns (boxes (max_det, 4), scores (max_det,), valid (max_det,)): kept boxes in
  descending score order, zero padded. Memory O(K): one IoU row per kept box.
  """
  k = boxes.shape[0]
  neg = jnp.asarray(-jnp.inf, scores.dtype)
  out_b = jnp.zeros((max_det, 4), boxes.dtype)
  out_s = jnp.zeros((max_det,), scores.dtype)
  out_v = jnp.zeros((max_det,), bool)

  def cond(carry):
    j, active, *_ = carry
    return (j < max_det) & jnp.any(active)

  def body(carry):
    j, active, ob, os_, ov = carry
    i = jnp.argmax(jnp.where(active, scores, neg))
    ious = B.iou_aligned(boxes[i][None], boxes)  # (K,)
    active = active & ~(ious > iou_thr) & (jnp.arange(k) != i)
    return (j + 1, active, ob.at[j].set(boxes[i]), os_.at[j].set(scores[i]), ov.at[j].set(True))

  _, _, out_b, out_s, out_v = jax.lax.while_loop(
      cond, body, (jnp.asarray(0), valid.astype(bool), out_b, out_s, out_v))
  return out_b, out_s, out_v


def postprocess(outputs: Dict[str, jax.Array], anchors: jax.Array, image_size,
                *, score_thr: float = 0.02, nms_iou: float = 0.4, max_det: int = 1000,
                pre_nms_topk: int = 5000, alpha: float = 0.4, min_size: float = 1.0,
                min_height: float = 0.0, scale: jax.Array | None = None,
                means: Sequence[float] = B.TARGET_MEANS,
                stds: Sequence[float] = B.TARGET_STDS) -> Dict[str, jax.Array]:
  """Model outputs (B, N, .) + anchors (N, 4) -> {'boxes' (B, D, 4), 'scores' (B, D),
  'valid' (B, D)}, D = max_det.

  image_size: (H, W) of the network input (boxes are clipped to it). scale: optional (B,)
  resize factor per image (input = original * scale); boxes come back divided by it, in
  original-image pixels, and min_height applies there.
  """
  h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
  n_img, n = outputs["cls"].shape[:2]
  cls = jax.nn.sigmoid(outputs["cls"][..., 0].astype(jnp.float32))
  iou = jax.nn.sigmoid(outputs["iou"][..., 0].astype(jnp.float32))
  scores = cls ** (2 * alpha) * iou ** (2 * (1 - alpha))             # (B, N)
  topk = min(pre_nms_topk, n)
  top_s, idx = jax.lax.top_k(scores, topk)                             # (B, K)
  anc = jnp.asarray(anchors, jnp.float32)[idx]                         # (B, K, 4)
  deltas = jnp.take_along_axis(outputs["box"].astype(jnp.float32), idx[..., None], axis=1)
  bxs = B.decode(anc, deltas, means, stds, max_shape=(h, w))
  valid = (top_s > score_thr) & (jnp.sqrt(jnp.clip(B.area(bxs), 0.0)) >= min_size)
  if scale is not None:
    bxs = bxs / jnp.asarray(scale, jnp.float32).reshape(-1, 1, 1)
  if min_height > 0:
    valid &= (bxs[..., 3] - bxs[..., 1]) >= min_height
  ob, os_, ov = jax.vmap(lambda b, s, v: nms(b, s, v, nms_iou, max_det))(bxs, top_s, valid)
  return {"boxes": ob, "scores": os_, "valid": ov}
