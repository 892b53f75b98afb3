"""IJB-B / IJB-C 1:1 template verification, as insightface's IJB evaluation defines it.

insightface recognition/_evaluation_/ijb/ijb_11.py, step by step (docs/protocol.md, IJB):

1. image feature: the network's embedding of the aligned crop and of its mirror image,
   concatenated (`verification.flip_concat_embed`'s (N, 2D) layout, no normalisation);
   `use_flip_test=True` sums the two halves, False keeps the first (unflipped) one;
2. `use_norm_score=True` keeps each image feature's norm (a quality weight); False
   L2-normalises it;
3. `use_detector_score=True` multiplies it by the face detector's score of the image
   (`ijbc_name_5pts_score.txt`'s last column);
4. per template: the images of one media (one photo, or the frames of one video) are
   averaged, and the media features summed; the sum is L2-normalised;
5. score of a template pair = cosine (dot product of the normalised template features);
6. ROC over all pairs (sklearn's `roc_curve`, with its default `drop_intermediate=True`) and
   TAR at each FAR of 1e-6 ... 1e-1: the TPR of the ROC point whose FPR is nearest (ties: the
   point with the larger TPR).

insightface's defaults are all three switches on. Steps 1-3 and the accumulation of step 4
run batch by batch (`TemplateFeatures.add`), so the images never need to be in memory at once:
what is held is one float32 sum per (template, media). The float32 / float64 arithmetic and
its order follow ijb_11.py, so the TAR@FAR values are the same numbers (tests/test_ijb.py
compares with a numpy + sklearn transcription of ijb_11.py on a fixture set). The ROC is
numpy (sklearn's algorithm: stable descending sort, one point per distinct score, collinear
points dropped); scikit-learn stays a test-only dependency.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def far_key(far: float) -> str:
  """The result key of one FAR: 'TAR@FAR=1e-06'."""
  return f"TAR@FAR={far:.0e}"


def image_features(embeddings: np.ndarray, scores: Optional[np.ndarray] = None, *,
                   use_flip_test: bool = True, use_norm_score: bool = True,
                   use_detector_score: bool = True) -> np.ndarray:
  """Steps 1-3: flip-concat embeddings (B, 2D) [+ detector scores (B,)] -> float32 (B, D)."""
  e = np.asarray(embeddings, np.float32)
  if e.ndim != 2 or e.shape[1] % 2:
    raise ValueError(f"IJB image features need (B, 2D) flip-concat embeddings, got {e.shape}")
  d = e.shape[1] // 2
  x = e[:, :d] + e[:, d:] if use_flip_test else e[:, :d]
  if not use_norm_score:
    x = x / np.sqrt(np.sum(x ** 2, -1, keepdims=True))
  if use_detector_score:
    if scores is None:
      raise ValueError("use_detector_score=True needs the detector scores of the images")
    s = np.asarray(scores, np.float32).reshape(-1)
    if s.shape[0] != x.shape[0]:
      raise ValueError(f"{x.shape[0]} embeddings but {s.shape[0]} detector scores")
    x = x * s[:, np.newaxis]
  return x


class TemplateFeatures:
  """Steps 1-4 over batches of images; memory: one float32 (D,) sum per (template, media).

      acc = TemplateFeatures(templates, medias)        # (N,) ids of every image of the set
      for idx, emb, score in batches:                  # idx: rows of the set, ascending
        acc.add(idx, emb, score)
      template_ids, feats = acc.result()               # (T,), (T, D) float64, L2-normalised

  Images must come in ascending row order (a loader without shuffling) for the sums to be
  added in ijb_11.py's order; each image exactly once (result() checks the count).
  """

  def __init__(self, templates: np.ndarray, medias: np.ndarray, *, use_flip_test: bool = True,
               use_norm_score: bool = True, use_detector_score: bool = True):
    t = np.asarray(templates, np.int64).reshape(-1)
    m = np.asarray(medias, np.int64).reshape(-1)
    if t.shape != m.shape:
      raise ValueError(f"templates {t.shape} and medias {m.shape} must list the same images")
    if t.size == 0:
      raise ValueError("an IJB set needs at least one image")
    self.switches = dict(use_flip_test=use_flip_test, use_norm_score=use_norm_score,
                         use_detector_score=use_detector_score)
    pairs, self._group = np.unique(np.stack([t, m], 1), axis=0, return_inverse=True)
    self._group = self._group.reshape(-1)
    self.template_ids, self._media_template = np.unique(pairs[:, 0], return_inverse=True)
    self._media_template = self._media_template.reshape(-1)
    self._count = np.bincount(self._group, minlength=len(pairs)).astype(np.float32)
    self._sums: Optional[np.ndarray] = None  # (groups, D) float32
    self._seen = np.zeros(t.size, bool)
    self._last = -1

  def add(self, index: np.ndarray, embeddings: np.ndarray,
          scores: Optional[np.ndarray] = None) -> None:
    """index (B,): the images' rows; embeddings (B, 2D); scores (B,) detector scores."""
    idx = np.asarray(index, np.int64).reshape(-1)
    x = image_features(embeddings, scores, **self.switches)
    if idx.shape[0] != x.shape[0]:
      raise ValueError(f"{idx.shape[0]} image rows for {x.shape[0]} embeddings")
    if idx.size == 0:
      return
    if idx.min() < 0 or idx.max() >= self._seen.size:
      raise ValueError(f"image rows must be in [0, {self._seen.size}), got {idx.min()}.."
                       f"{idx.max()}")
    if idx[0] <= self._last or np.any(np.diff(idx) <= 0):
      raise ValueError("add images in ascending row order, each once (a loader without "
                       "shuffling): the per-media sums follow the set's order")
    self._last = int(idx[-1])
    self._seen[idx] = True
    if self._sums is None:
      self._sums = np.zeros((self._count.size, x.shape[1]), np.float32)
    np.add.at(self._sums, self._group[idx], x)  # in row order, as np.mean's running sum

  def result(self) -> Tuple[np.ndarray, np.ndarray]:
    """(template ids (T,) ascending, their L2-normalised features (T, D) float64)."""
    if self._sums is None or not self._seen.all():
      missing = int((~self._seen).sum())
      raise ValueError(f"{missing} of {self._seen.size} images were never added; every image "
                       "of the set takes part in its templates")
    media = self._sums / self._count[:, np.newaxis]  # float32 means
    tsum = np.zeros((self.template_ids.size, media.shape[1]), np.float32)
    np.add.at(tsum, self._media_template, media)  # media in ascending id, per template
    return self.template_ids, l2_normalize_rows(tsum.astype(np.float64))


def l2_normalize_rows(x: np.ndarray) -> np.ndarray:
  """Rows / their L2 norm (a zero row stays zero), as sklearn.preprocessing.normalize."""
  norms = np.sqrt(np.einsum("ij,ij->i", x, x))
  norms[norms == 0.0] = 1.0
  return x / norms[:, np.newaxis]


def pair_scores(template_ids: np.ndarray, template_feats: np.ndarray, t1: np.ndarray,
                t2: np.ndarray, batch: int = 100_000) -> np.ndarray:
  """Step 5: cosine of each template pair (P,) float64, in batches of `batch` pairs."""
  ids = np.asarray(template_ids)
  t1, t2 = np.asarray(t1).reshape(-1), np.asarray(t2).reshape(-1)
  pos = []
  for t in (t1, t2):
    p = np.searchsorted(ids, t)
    bad = (p >= ids.size) | (ids[np.minimum(p, ids.size - 1)] != t)
    if bad.any():
      raise ValueError(f"pair {int(np.argmax(bad))}: template {int(t[np.argmax(bad)])} has no "
                       "image; every template of a pair needs at least one")
    pos.append(p)
  out = np.empty(t1.size, np.float64)
  for s in range(0, t1.size, batch):
    f1, f2 = template_feats[pos[0][s:s + batch]], template_feats[pos[1][s:s + batch]]
    out[s:s + batch] = np.sum(f1 * f2, -1)
  return out


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> Tuple[np.ndarray, np.ndarray,
                                                                np.ndarray]:
  """(fpr, tpr, thresholds) as sklearn.metrics.roc_curve(labels, scores) (labels 1 = same)."""
  y = np.asarray(labels).reshape(-1) == 1
  s = np.asarray(scores).reshape(-1)
  if y.shape != s.shape:
    raise ValueError(f"{y.size} labels for {s.size} scores")
  if y.all() or not y.any():
    raise ValueError("TAR@FAR needs both genuine (label 1) and impostor (label 0) pairs")
  order = np.argsort(-s.astype(np.float64), kind="stable")  # descending; ties: any order
  s, y = s[order], y[order].astype(np.float64)
  idx = np.concatenate([np.nonzero(np.diff(s))[0], [y.size - 1]])
  tps = np.cumsum(y)[idx]
  fps = 1 + idx.astype(np.float64) - tps
  thr = s[idx]
  if fps.size > 2:
    keep = np.concatenate([[True], np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), [True]])
    keep = np.nonzero(keep)[0]
    tps, fps, thr = tps[keep], fps[keep], thr[keep]
  tps, fps = np.concatenate([[0.0], tps]), np.concatenate([[0.0], fps])
  thr = np.concatenate([[np.inf], thr.astype(np.float64)])
  return fps / fps[-1], tps / tps[-1], thr


def tar_at_far(labels: np.ndarray, scores: np.ndarray, fars: Sequence[float] = FARS
               ) -> Dict[str, float]:
  """Step 6: {'TAR@FAR=1e-06': tpr, ...}: the ROC point of nearest FPR, larger TPR on ties."""
  fpr, tpr, _ = roc_curve(labels, scores)
  out = {}
  for far in fars:
    d = np.abs(fpr - far)[::-1]  # reversed: argmin's first hit is the last (largest-TPR) point
    out[far_key(far)] = float(tpr[tpr.size - 1 - int(np.argmin(d))])
  return out


def evaluate(embeddings: np.ndarray, templates: np.ndarray, medias: np.ndarray,
             scores: Optional[np.ndarray], pair_t1: np.ndarray, pair_t2: np.ndarray,
             pair_labels: np.ndarray, *, use_flip_test: bool = True, use_norm_score: bool = True,
             use_detector_score: bool = True, fars: Sequence[float] = FARS) -> Dict[str, float]:
  """The whole protocol on in-memory arrays: embeddings (N, 2D) in the set's image order."""
  acc = TemplateFeatures(templates, medias, use_flip_test=use_flip_test,
                         use_norm_score=use_norm_score, use_detector_score=use_detector_score)
  acc.add(np.arange(np.asarray(embeddings).shape[0]), embeddings, scores)
  return evaluate_templates(acc, pair_t1, pair_t2, pair_labels, fars)


def evaluate_templates(acc: TemplateFeatures, pair_t1: np.ndarray, pair_t2: np.ndarray,
                       pair_labels: np.ndarray, fars: Sequence[float] = FARS
                       ) -> Dict[str, float]:
  """Steps 4-6 once every image was added to `acc` (the streaming path's end)."""
  ids, feats = acc.result()
  return tar_at_far(pair_labels, pair_scores(ids, feats, pair_t1, pair_t2), fars)


__all__ = ["FARS", "far_key", "image_features", "TemplateFeatures", "l2_normalize_rows",
           "pair_scores", "roc_curve", "tar_at_far", "evaluate", "evaluate_templates"]
