"""Detection ops for TinaFace: boxes, anchor assignment, losses, post-processing."""
from askd_jax.detection.assign import Assignment, max_iou_assign
from askd_jax.detection.boxes import decode, diou, encode, iou_aligned, iou_matrix
from askd_jax.detection.losses import detection_loss, diou_loss, sigmoid_focal_loss
from askd_jax.detection.postprocess import nms, postprocess

__all__ = ["Assignment", "max_iou_assign", "decode", "diou", "encode", "iou_aligned",
           "iou_matrix", "detection_loss", "diou_loss", "sigmoid_focal_loss", "nms",
           "postprocess"]
