"""Max-IoU anchor assignment (vedadet / mmdet MaxIoUAssigner), static shapes for jit.

Ground truth is padded to a fixed count G per image with a validity mask; padded rows
never match. TinaFace's settings: pos_iou_thr = neg_iou_thr = min_pos_iou = 0.35,
low-quality matches on, gt_max_assign_all on, no ignore regions.
Steps (order matters, as in mmdet):
  1. every anchor is "ignored";
  2. anchors whose best IoU is in [0, neg_iou_thr) are negative (no valid gt: all negative);
  3. anchors whose best IoU >= pos_iou_thr are positive, matched to that gt;
  4. low-quality matches: for each gt (in order, later ones win) whose best IoU over
     anchors >= min_pos_iou, every anchor reaching that best IoU is matched to it.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from askd_jax.detection.boxes import iou_matrix


class Assignment(NamedTuple):
  positive: jax.Array   # (N,) bool
  negative: jax.Array   # (N,) bool; neither = ignored (no loss)
  gt_index: jax.Array   # (N,) int32 index into the padded gt (0 where not positive)
  max_iou: jax.Array    # (N,) float32 best IoU with any valid gt (0 without gt)


def max_iou_assign(anchors: jax.Array, gt_boxes: jax.Array, gt_valid: jax.Array,
                   pos_iou_thr: float = 0.35, neg_iou_thr: float = 0.35,
                   min_pos_iou: float = 0.35, match_low_quality: bool = True,
                   gt_max_assign_all: bool = True) -> Assignment:
  """anchors (N, 4), gt_boxes (G, 4), gt_valid (G,) bool -> Assignment for one image."""
  g = gt_boxes.shape[0]
  if g == 0:
    n = anchors.shape[0]
    z = jnp.zeros((n,), jnp.float32)
    return Assignment(z > 0, z == 0, jnp.zeros((n,), jnp.int32), z)
  valid = gt_valid.astype(bool)
  ious = jnp.where(valid[:, None], iou_matrix(gt_boxes.astype(jnp.float32),
                                              anchors.astype(jnp.float32)), -1.0)  # (G, N)
  max_iou = jnp.max(ious, axis=0)
  argmax = jnp.argmax(ious, axis=0).astype(jnp.int32)
  has_gt = jnp.any(valid)
  max_iou = jnp.where(has_gt, max_iou, 0.0)
  negative = (max_iou >= 0) & (max_iou < neg_iou_thr)
  positive = has_gt & (max_iou >= pos_iou_thr)
  gt_index = jnp.where(positive, argmax, 0)
  if match_low_quality:
    gt_max = jnp.max(ious, axis=1)  # (G,)
    ok = valid & (gt_max >= min_pos_iou)
    if gt_max_assign_all:
      hit = ok[:, None] & (ious == gt_max[:, None])  # (G, N)
    else:
      hit = ok[:, None] & (jnp.arange(anchors.shape[0])[None, :]
                           == jnp.argmax(ious, axis=1)[:, None])
    any_hit = jnp.any(hit, axis=0)
    last = (g - 1 - jnp.argmax(hit[::-1], axis=0)).astype(jnp.int32)  # later gt wins
    gt_index = jnp.where(any_hit, last, gt_index)
    positive = positive | any_hit
  negative = negative & ~positive
  return Assignment(positive, negative, gt_index, max_iou.astype(jnp.float32))
