"""TinaFace's training loss (vedadet IoUBBoxAnchorCriterion), batched and static-shape.

  cls: sigmoid focal loss (gamma 2, alpha 0.25) over positive and negative anchors
  box: DIoU loss (weight 2) between the decoded predicted box and its gt, positives only
  iou: BCE between the IoU logit and the IoU of the (gradient-stopped) decoded box with
       its gt, positives only
Each term is summed and divided by num_pos = sum over images of max(positives, 1), as
vedadet does; under jit over a sharded batch that sum is global.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp

from askd_jax.detection import boxes as B
from askd_jax.detection.assign import max_iou_assign

DEFAULTS = dict(focal_gamma=2.0, focal_alpha=0.25, cls_weight=1.0, box_weight=2.0,
                iou_weight=1.0, pos_iou_thr=0.35, neg_iou_thr=0.35, min_pos_iou=0.35,
                target_means=B.TARGET_MEANS, target_stds=B.TARGET_STDS)


def _cfg(cfg: Any, key: str):
  if cfg is None:
    return DEFAULTS[key]
  get = getattr(cfg, "get", None)
  value = get(key, None) if get is not None else getattr(cfg, key, None)
  return DEFAULTS[key] if value is None else value


def sigmoid_focal_loss(logits: jax.Array, targets: jax.Array, gamma: float = 2.0,
                       alpha: float = 0.25) -> jax.Array:
  """Elementwise focal loss (Lin et al. 2017) on logits; targets in {0, 1}."""
  logits = logits.astype(jnp.float32)
  t = targets.astype(jnp.float32)
  p = jax.nn.sigmoid(logits)
  pt = (1 - p) * t + p * (1 - t)  # 1 - prob of the true class
  w = (alpha * t + (1 - alpha) * (1 - t)) * pt ** gamma
  return w * _bce_logits(logits, t)


def _bce_logits(logits: jax.Array, t: jax.Array) -> jax.Array:
  # max(x, 0) - x t + log(1 + exp(-|x|)): stable binary_cross_entropy_with_logits
  return jnp.maximum(logits, 0) - logits * t + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def diou_loss(pred: jax.Array, target: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Elementwise 1 - DIoU, (..., 4) -> (...)."""
  return 1.0 - B.diou(pred, target, eps)


def detection_loss(outputs: Dict[str, jax.Array], anchors: jax.Array, gt_boxes: jax.Array,
                   gt_valid: jax.Array, cfg: Any = None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """outputs {'cls' (B, N, 1), 'box' (B, N, 4), 'iou' (B, N, 1)}, anchors (N, 4),
  gt_boxes (B, G, 4) x1y1x2y2 in input pixels, gt_valid (B, G) -> (loss, metrics).

  cfg: None, a dict or a ConfigDict with any of DEFAULTS' keys.
  """
  anchors = jnp.asarray(anchors, jnp.float32)
  assign = jax.vmap(lambda g, v: max_iou_assign(
      anchors, g, v, _cfg(cfg, "pos_iou_thr"), _cfg(cfg, "neg_iou_thr"),
      _cfg(cfg, "min_pos_iou")))(gt_boxes.astype(jnp.float32), gt_valid)
  pos, neg = assign.positive, assign.negative                       # (B, N)
  num_pos = jnp.sum(jnp.maximum(jnp.sum(pos, axis=1), 1)).astype(jnp.float32)

  cls_logits = outputs["cls"][..., 0].astype(jnp.float32)
  focal = sigmoid_focal_loss(cls_logits, pos, _cfg(cfg, "focal_gamma"), _cfg(cfg, "focal_alpha"))
  loss_cls = jnp.sum(jnp.where(pos | neg, focal, 0.0)) / num_pos

  means, stds = _cfg(cfg, "target_means"), _cfg(cfg, "target_stds")
  pred_boxes = B.decode(anchors[None], outputs["box"].astype(jnp.float32), means, stds)
  matched = jnp.take_along_axis(gt_boxes.astype(jnp.float32), assign.gt_index[..., None], axis=1)
  # Non-positive anchors get a dummy pair so no NaN/inf leaks into the masked sums' gradients.
  safe_pred = jnp.where(pos[..., None], pred_boxes, jnp.asarray([0.0, 0.0, 1.0, 1.0]))
  safe_gt = jnp.where(pos[..., None], matched, jnp.asarray([0.0, 0.0, 1.0, 1.0]))
  loss_box = jnp.sum(jnp.where(pos, diou_loss(safe_pred, safe_gt), 0.0)) / num_pos

  iou_target = jax.lax.stop_gradient(B.iou_aligned(safe_pred, safe_gt))
  bce = _bce_logits(outputs["iou"][..., 0].astype(jnp.float32), iou_target)
  loss_iou = jnp.sum(jnp.where(pos, bce, 0.0)) / num_pos

  loss = (_cfg(cfg, "cls_weight") * loss_cls + _cfg(cfg, "box_weight") * loss_box
          + _cfg(cfg, "iou_weight") * loss_iou)
  n_pos = jnp.sum(pos).astype(jnp.float32)
  metrics = {"loss_cls": loss_cls, "loss_box": loss_box, "loss_iou": loss_iou,
             "num_pos": n_pos / pos.shape[0],
             "pos_iou": jnp.sum(jnp.where(pos, iou_target, 0.0)) / jnp.maximum(n_pos, 1.0)}
  return loss, metrics
