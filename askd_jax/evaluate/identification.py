"""Closed-set identification (TinyFace protocol): rank-k of probes against a gallery.

The gallery is the match set plus distractors (label -100, never a mate). Embeddings are
flip-averaged ((f(x) + f(flip x)) / 2) and L2-normalised; score = cosine. Like the official
`test_tinyface.py`, accuracy divides by ALL probes (a probe without a mate counts as a miss).
"""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

DISTRACTOR_LABEL = -100


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def flip_average(flip_concat: np.ndarray) -> np.ndarray:
  """(f(x) + f(flip x)) / 2 from the flip-concat embeddings of
  `verification.flip_concat_embed` (B, 2D) -> (B, D), as the official `test_tinyface.py`
  fuses them (`rank_k` then L2-normalises, as its `calc_accuracy(do_norm=True)`)."""
  e = np.asarray(flip_concat, np.float32)
  if e.ndim != 2 or e.shape[1] % 2:
    raise ValueError(f"flip_average needs (B, 2D) flip-concat embeddings, got shape {e.shape}")
  d = e.shape[1] // 2
  return (e[:, :d] + e[:, d:]) / 2


def rank_k(probe_emb: np.ndarray, probe_labels: np.ndarray, gallery_emb: np.ndarray,
           gallery_labels: np.ndarray, ks: Sequence[int] = (1, 5, 10, 20), *,
           normalize: bool = True, chunk: int = 256) -> Dict[str, float]:
  """{'rank1': acc, ...} in [0, 1]: a probe is a hit at k when a gallery item of its label
  is among the k highest cosine scores.

  Ties are broken like a stable descending sort (lower gallery index first). Works in
  probe chunks: TinyFace's 3.7k probes x 158k gallery never materialise at once.
  probe_emb: (P, D), gallery_emb: (G, D).
  """
  p = l2_normalize(probe_emb) if normalize else np.asarray(probe_emb, np.float32)
  g = l2_normalize(gallery_emb) if normalize else np.asarray(gallery_emb, np.float32)
  pl, gl = np.asarray(probe_labels).reshape(-1), np.asarray(gallery_labels).reshape(-1)
  if p.shape[0] != pl.shape[0] or g.shape[0] != gl.shape[0]:
    raise ValueError(f"embeddings/labels disagree: probes {p.shape} vs {pl.shape}, "
                     f"gallery {g.shape} vs {gl.shape}")
  if p.shape[0] == 0 or g.shape[0] == 0:
    raise ValueError(f"rank_k needs probes and a gallery, got {p.shape[0]} and {g.shape[0]}")
  if np.any(pl == DISTRACTOR_LABEL):
    raise ValueError(f"a probe has the distractor label {DISTRACTOR_LABEL}; distractors belong "
                     "to the gallery only")
  ranks = np.empty(p.shape[0], np.int64)  # 0-based position of the first mate; G if none
  idx = np.arange(g.shape[0])
  for s in range(0, p.shape[0], chunk):
    scores = p[s:s + chunk] @ g.T  # (c, G)
    mate = pl[s:s + chunk, None] == gl[None, :]
    best = np.where(mate, scores, -np.inf).max(axis=1, keepdims=True)  # (c, 1)
    has = np.isfinite(best[:, 0])
    # first mate in stable order = lowest index among mates scoring `best`
    first = np.where(mate & (scores == best), idx, g.shape[0]).min(axis=1, keepdims=True)
    ahead = (scores > best) | ((scores == best) & (idx < first))
    ranks[s:s + chunk] = np.where(has, ahead.sum(axis=1), g.shape[0])
  return {f"rank{k}": float(np.mean(ranks < k)) for k in ks}


__all__ = ["rank_k", "flip_average", "l2_normalize", "DISTRACTOR_LABEL"]
