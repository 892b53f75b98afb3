"""The official WIDER FACE evaluation (easy / medium / hard AP).

Semantics of the official eval_tools (MATLAB, wider_eval.m; the same steps as the common
python ports), reproduced here with numpy:

- Predictions: per image an (N, 5) array of boxes + score. `box_format='xyxy'` (default,
  what the detector emits): x1, y1, x2, y2, score. `box_format='xywh'`: left, top, width,
  height, score (the official submission files); converted with x2 = x1 + w.
- Detections of each image are sorted by score, descending (stable), as read_pred.m does.
- Scores are min-max normalised over ALL given predictions with the official quirk:
  max starts at 0 and min at 1, so min = min(1, scores), max = max(0, scores). If every
  score is the same value in [0, 1] (official: 0/0) all normalised scores are 1.
- Ground truth boxes are x, y, w, h (face_bbx_list); x2 = x + w. IoU uses the +1 pixel
  convention: areas (x2 - x1 + 1) * (y2 - y1 + 1), computed in float64 as MATLAB does.
- Per image, detections in score order: a detection whose best-overlap ground truth box
  (argmax, first on ties) has IoU >= 0.5 is
    * ignored (neither TP nor FP, not counted as a proposal) if that box is not in the
      difficulty's keep list, whatever happened before;
    * a TP if that kept box was not yet recalled; otherwise a FP (duplicate).
  Other detections are FPs. A detection is never re-assigned to its second-best box.
- Images with no ground truth box or no detection are skipped (their detections are not
  FPs), but their kept faces still count in the recall denominator.
- 1000 thresholds t_k = 1 - k/1000, k = 1..1000: per image, proposals and recalled faces
  among detections with score >= t_k, summed over images; precision = TP / proposals
  (0 when there is no proposal: the official NaN there never reaches the AP), recall =
  TP / number of kept faces; VOC all-point AP with sentinels (0, 0) and (1, 0).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

import numpy as np

DIFFICULTIES = ("easy", "medium", "hard")


@dataclasses.dataclass(frozen=True)
class ImageGT:
  """Ground truth of one image for the evaluator.

  name: '<event>/<file stem>', e.g. '0--Parade/0_Parade_marchingband_1_465'.
  boxes: (G, 4) float64, x, y, w, h as in the official files (all boxes, invalid included).
  keep: difficulty -> 0-based indices into boxes of the faces that count (the .mat keep
    lists minus one); boxes outside it are ignore regions.
  """
  name: str
  boxes: np.ndarray
  keep: Mapping[str, np.ndarray]


def image_key(name: str) -> str:
  """'0--Parade/x.jpg' and '0--Parade/x' name the same image."""
  stem, ext = os.path.splitext(name)
  return stem if ext.lower() in (".jpg", ".jpeg", ".png") else name


def normalize_scores(predictions: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Official min-max normalisation of column 4 over the whole set (see module doc)."""
  max_score, min_score = 0.0, 1.0
  for p in predictions.values():
    if len(p):
      max_score = max(max_score, float(np.max(p[:, 4])))
      min_score = min(min_score, float(np.min(p[:, 4])))
  diff = max_score - min_score
  out = {}
  for k, p in predictions.items():
    q = p.copy()
    if len(q):
      q[:, 4] = (q[:, 4] - min_score) / diff if diff != 0 else 1.0
    out[k] = q
  return out


def iou_plus_one(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """IoU with the +1 pixel convention of the official tools. a: (P, 4), b: (G, 4) xyxy -> (P, G)."""
  iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + 1
  ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + 1
  inter = iw * ih
  area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
  area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
  with np.errstate(divide="ignore", invalid="ignore"):
    iou = inter / (area_a[:, None] + area_b[None, :] - inter)
  return np.where((iw > 0) & (ih > 0), iou, 0.0)


def _image_pr(best_iou: np.ndarray, best_gt: np.ndarray, keep_mask: np.ndarray,
              scores: np.ndarray, thresholds: np.ndarray, iou_thresh: float) -> np.ndarray:
  """(T, 2) [proposals, recalled kept faces] of one image at each threshold.

  best_iou, best_gt, scores: (P,) for detections sorted by score (descending).
  """
  matched = best_iou >= iou_thresh
  kept_hit = matched & keep_mask[best_gt]
  proposal = ~(matched & ~keep_mask[best_gt])
  # A kept face counts once, at the first detection that hits it.
  first_hit = np.zeros_like(kept_hit)
  hit_idx = np.nonzero(kept_hit)[0]
  _, first = np.unique(best_gt[hit_idx], return_index=True)
  first_hit[hit_idx[first]] = True
  recalled = np.cumsum(first_hit)  # (P,)
  proposals = np.cumsum(proposal)  # (P,)
  # Detections with score >= t: a prefix of the sorted list, of length n_above.
  n_above = scores.size - np.searchsorted(scores[::-1], thresholds, side="left")  # (T,)
  last = np.maximum(n_above - 1, 0)
  has = n_above > 0
  return np.stack([np.where(has, proposals[last], 0), np.where(has, recalled[last], 0)], axis=1)


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
  """All-point VOC AP: area under the monotone precision envelope."""
  mrec = np.concatenate(([0.0], recall, [1.0]))
  mpre = np.concatenate(([0.0], precision, [0.0]))
  mpre = np.maximum.accumulate(mpre[::-1])[::-1]
  i = np.nonzero(mrec[1:] != mrec[:-1])[0]
  return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _to_xyxy_pred(p: np.ndarray, box_format: str, key: str) -> np.ndarray:
  p = np.asarray(p, np.float64)
  if p.size == 0:
    return np.zeros((0, 5))
  if p.ndim != 2 or p.shape[1] != 5:
    raise ValueError(f"predictions[{key!r}] must be (N, 5) boxes + score, got shape {p.shape}")
  if box_format == "xywh":
    p = p.copy()
    p[:, 2] += p[:, 0]
    p[:, 3] += p[:, 1]
  elif box_format != "xyxy":
    raise ValueError(f"box_format must be 'xyxy' or 'xywh', got {box_format!r}")
  return p


def pr_curves(predictions: Mapping[str, np.ndarray], gt: Sequence[ImageGT], *,
              box_format: str = "xyxy", iou_thresh: float = 0.5, thresh_num: int = 1000,
              difficulties: Sequence[str] = DIFFICULTIES, allow_missing: bool = False
              ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """difficulty -> (precision (T,), recall (T,)) of the official protocol."""
  preds = {}
  for k, p in predictions.items():
    preds[image_key(k)] = _to_xyxy_pred(p, box_format, k)
  preds = normalize_scores(preds)
  thresholds = 1 - np.arange(1, thresh_num + 1) / thresh_num  # (T,)
  curves = {d: np.zeros((thresh_num, 2)) for d in difficulties}
  count_face = {d: 0 for d in difficulties}
  for img in gt:
    key = image_key(img.name)
    if key not in preds and not allow_missing:
      raise KeyError(f"no predictions for image {key!r}; give an empty (0, 5) array for images "
                     "without detections or pass allow_missing=True")
    for d in difficulties:
      count_face[d] += len(img.keep[d])
    p = preds.get(key, np.zeros((0, 5)))
    boxes = np.asarray(img.boxes, np.float64).reshape(-1, 4)
    if len(boxes) == 0 or len(p) == 0:
      continue
    p = p[np.argsort(-p[:, 4], kind="stable")]
    g = boxes.copy()
    g[:, 2] += g[:, 0]
    g[:, 3] += g[:, 1]
    iou = iou_plus_one(p[:, :4], g)  # (P, G)
    best_gt = np.argmax(iou, axis=1)
    best_iou = iou[np.arange(len(p)), best_gt]
    for d in difficulties:
      keep_mask = np.zeros(len(g), bool)
      keep_mask[np.asarray(img.keep[d], np.int64)] = True
      curves[d] += _image_pr(best_iou, best_gt, keep_mask, p[:, 4], thresholds, iou_thresh)
  out = {}
  for d in difficulties:
    proposals, tp = curves[d][:, 0], curves[d][:, 1]
    precision = np.divide(tp, proposals, out=np.zeros_like(tp), where=proposals > 0)
    recall = tp / count_face[d] if count_face[d] else np.full_like(tp, np.nan)
    out[d] = (precision, recall)
  return out


def evaluate_widerface(predictions: Mapping[str, np.ndarray], gt: Sequence[ImageGT], *,
                       box_format: str = "xyxy", iou_thresh: float = 0.5,
                       thresh_num: int = 1000, difficulties: Sequence[str] = DIFFICULTIES,
                       allow_missing: bool = False) -> dict[str, float]:
  """{'easy': AP, 'medium': AP, 'hard': AP} (NaN for a difficulty without kept faces).

  predictions: image name ('<event>/<stem>', '.jpg' optional) -> (N, 5) boxes + score.
  gt: ImageGT per image, e.g. from askd_jax.data.widerface.load_widerface_gt.
  """
  curves = pr_curves(predictions, gt, box_format=box_format, iou_thresh=iou_thresh,
                     thresh_num=thresh_num, difficulties=difficulties,
                     allow_missing=allow_missing)
  return {d: (voc_ap(rec, prec) if not np.isnan(rec).any() else float("nan"))
          for d, (prec, rec) in curves.items()}


def write_official_predictions(predictions: Mapping[str, np.ndarray], out_dir: str,
                               box_format: str = "xyxy") -> None:
  """Write <out_dir>/<event>/<stem>.txt in the submission format of the official tools
  (file name line, count line, then 'left top width height score' lines)."""
  for k, p in predictions.items():
    key = image_key(k)
    p = _to_xyxy_pred(p, box_format, k)
    path = os.path.join(out_dir, key + ".txt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      f.write(f"{os.path.basename(key)}\n{len(p)}\n")
      for x1, y1, x2, y2, s in p:
        f.write(f"{x1:.3f} {y1:.3f} {x2 - x1:.3f} {y2 - y1:.3f} {s:.6f}\n")


def read_official_predictions(pred_dir: str) -> dict[str, np.ndarray]:
  """Read a directory written in the submission format -> {'<event>/<stem>': (N, 5) xywh}."""
  out = {}
  for event in sorted(os.listdir(pred_dir)):
    event_dir = os.path.join(pred_dir, event)
    if not os.path.isdir(event_dir):
      continue
    for fname in sorted(os.listdir(event_dir)):
      path = os.path.join(event_dir, fname)
      with open(path) as f:
        lines = [ln.strip() for ln in f.read().splitlines()]
      rows = []
      for lineno, ln in enumerate(lines[2:], start=3):
        if not ln:
          continue
        try:
          rows.append([float(v) for v in ln.split()[:5]])
        except ValueError:
          raise ValueError(f"{path}:{lineno}: expected 'left top width height score', "
                           f"got {ln!r}") from None
      out[f"{event}/{os.path.splitext(fname)[0]}"] = np.array(rows, np.float64).reshape(-1, 5)
  return out
