"""10-fold face verification, exactly as the official A-SKD evaluation.

The official code (gist-ailab/teaching-where-to-look, evaluation/eval_agedb.py, itself from
the Face_Pytorch LFW/AgeDB evaluation) does, for each fold i of 10:

  1. mu = mean over the rows of concat(L[train], R[train]): one mean over both images of
     every pair outside fold i (pairs of all folds are then centred with it);
  2. L, R L2-normalised row-wise; score = sum(L * R) (cosine);
  3. on the nine training folds, accuracy(t) = (#{pos: s > t} + #{neg: s < t}) / n for
     t in arange(-10000, 10001) / 10000 (both inequalities strict: a score equal to t is
     wrong for either label);
  4. the threshold is the MEAN of all thresholds reaching the maximum accuracy (not the
     first argmax, as insightface does: `tie='first'` gives that variant);
  5. accuracy of that threshold on fold i.

The sweep here is vectorised (sorted scores + searchsorted counts) and equals the loop
exactly: counts are integers, and the thresholds and their mean are computed with the same
numpy expressions as the official code.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np


def flip_concat_embed(embed_fn: Callable[[Any], Any], images: Any,
                      degrade: Optional[Callable[[Any], Any]] = None) -> Any:
  """concat(embed(D(x)), embed(D(flip x))) on the last axis: the official evaluation views.

  The official loader (dataset/agedb.py) flips the high-resolution image first
  (`cv2.flip(HR, 1)`) and then degrades each view separately; nearest resizing does not
  commute with the flip, so the order matters. `degrade` (None: HR) must be the same
  deterministic function for both views (with several sizes, the same key: the same size).
  images: (B, H, W, C) (numpy or jax); embed_fn: (B, H, W, C) -> (B, D). Returns (B, 2D).
  """
  views = [images, images[:, :, ::-1]]
  if degrade is not None:
    views = [degrade(v) for v in views]
  e, e_flip = (embed_fn(v) for v in views)
  if isinstance(e, np.ndarray):
    return np.concatenate([e, np.asarray(e_flip)], axis=-1)
  import jax.numpy as jnp  # jax arrays stay on device
  return jnp.concatenate([e, e_flip], axis=-1)


def equal_fold_ids(n: int, nfolds: int = 10) -> np.ndarray:
  """Folds of equal size in file order; when n % nfolds != 0 the first folds get one more
  pair (sklearn KFold without shuffling). For 6,000 pairs this is pair index // 600."""
  if n < nfolds:
    raise ValueError(f"verification needs at least nfolds={nfolds} pairs, got {n}")
  sizes = np.full(nfolds, n // nfolds)
  sizes[:n % nfolds] += 1
  return np.repeat(np.arange(nfolds), sizes)


def agedb_fold_ids(n: int, fold_size: int = 600) -> np.ndarray:
  """The official AgeDB-30 pair list rule: fold = pair index // 600."""
  return np.arange(n) // fold_size


def _as_float(x: Any, name: str) -> np.ndarray:
  x = np.asarray(x)
  if x.dtype not in (np.float32, np.float64):
    x = x.astype(np.float32)  # the official features are float32 (torch -> .mat single)
  if x.ndim != 2:
    raise ValueError(f"{name} must be (pairs, features), got shape {x.shape}")
  return x


def _positive_mask(issame: Any, n: int) -> np.ndarray:
  flags = np.asarray(issame)
  if flags.shape != (n,):
    raise ValueError(f"issame must have shape ({n},), got {flags.shape}")
  if flags.dtype == np.bool_:
    return flags
  values = set(np.unique(flags).tolist())
  if not values <= {1, 0, -1}:
    raise ValueError(f"issame must be bool or in {{1, 0}} / {{1, -1}}, got values {sorted(values)}")
  return flags == 1


def fold_scores(emb1: np.ndarray, emb2: np.ndarray, train: np.ndarray) -> np.ndarray:
  """Cosine scores of all pairs after centring on the training pairs' mean. (N,)"""
  mu = np.mean(np.concatenate((emb1[train], emb2[train]), 0), 0)[None, :]
  l = emb1 - mu
  r = emb2 - mu
  l = l / np.sqrt(np.sum(np.power(l, 2), 1))[:, None]
  r = r / np.sqrt(np.sum(np.power(r, 2), 1))[:, None]
  return np.sum(l * r, 1)


def sweep_thresholds(scores: np.ndarray, positive: np.ndarray, thr_num: int = 10000,
                     tie: str = "mean") -> float:
  """Best threshold on (scores, positive) over arange(-thr_num, thr_num + 1) / thr_num."""
  thresholds = np.arange(-thr_num, thr_num + 1) * 1.0 / thr_num  # (2 thr_num + 1,)
  # Comparisons float32 score vs float64 threshold happen in float64; the cast is exact.
  pos = np.sort(scores[positive].astype(np.float64))
  neg = np.sort(scores[~positive].astype(np.float64))
  n_pos_above = pos.size - np.searchsorted(pos, thresholds, side="right")  # s > t
  n_neg_below = np.searchsorted(neg, thresholds, side="left")  # s < t
  correct = n_pos_above + n_neg_below  # accuracy * n, exact integers
  if tie == "mean":
    return float(np.mean(thresholds[correct == correct.max()]))
  if tie == "first":
    return float(thresholds[np.argmax(correct)])
  raise ValueError(f"tie must be 'mean' (official) or 'first' (insightface), got {tie!r}")


def accuracy_at(scores: np.ndarray, positive: np.ndarray, threshold: float) -> float:
  p = np.sum(scores[positive] > threshold)
  n = np.sum(scores[~positive] < threshold)
  return 1.0 * (p + n) / len(scores)


def verification_accuracy(emb1: Any, emb2: Any, issame: Any, nfolds: int = 10,
                          fold_ids: Optional[Any] = None, thr_num: int = 10000,
                          tie: str = "mean") -> dict[str, Any]:
  """Official 10-fold verification accuracy.

  emb1, emb2: (N, D) pair embeddings, each already concat(emb(x), emb(flip(x))).
  issame: (N,) bool (or 1 / -1 flags as in the official pair lists).
  fold_ids: (N,) ints; default equal folds in file order. As in the official loop over
    range(nfolds), a pair whose id is outside [0, nfolds) is only ever a training pair.
  Returns {'mean', 'std' (numpy, ddof=0), 'accuracies' (nfolds,), 'thresholds' (nfolds,)}.
  """
  emb1 = _as_float(emb1, "emb1")
  emb2 = _as_float(emb2, "emb2")
  if emb1.shape != emb2.shape:
    raise ValueError(f"emb1 and emb2 must have the same shape, got {emb1.shape} and {emb2.shape}")
  n = emb1.shape[0]
  positive = _positive_mask(issame, n)
  folds = equal_fold_ids(n, nfolds) if fold_ids is None else np.asarray(fold_ids)
  if folds.shape != (n,):
    raise ValueError(f"fold_ids must have shape ({n},), got {folds.shape}")
  accs = np.zeros(nfolds)
  thrs = np.zeros(nfolds)
  for i in range(nfolds):
    test = folds == i
    train = ~test
    if not test.any() or not train.any():
      raise ValueError(f"fold {i} of {nfolds} is empty or holds every pair; check fold_ids")
    scores = fold_scores(emb1, emb2, train)
    if not np.all(np.isfinite(scores)):
      raise ValueError("verification scores are not finite: an embedding is NaN/inf or equals "
                       "the training mean (zero norm); check the model output")
    thrs[i] = sweep_thresholds(scores[train], positive[train], thr_num, tie)
    accs[i] = accuracy_at(scores[test], positive[test], thrs[i])
  return {"mean": float(np.mean(accs)), "std": float(np.std(accs)),
          "accuracies": accs, "thresholds": thrs}


def tar_at_far(emb1: Any, emb2: Any, issame: Any, far: float = 1e-2) -> float:
  """True accept rate at a false accept rate <= `far`, over all pairs at once (no folds).

  Scores are the cosines of `fold_scores` centred on the mean of every pair's embeddings (no
  labels used). The threshold t is the impostor score with floor(far * n_impostor) impostor
  scores above it; a pair is accepted when its score > t, so the realised FAR is
  floor(far * n) / n <= far. With 450 impostor pairs and far 1e-2: 4 false accepts allowed.
  """
  emb1, emb2 = _as_float(emb1, "emb1"), _as_float(emb2, "emb2")
  positive = _positive_mask(issame, emb1.shape[0])
  if not 0 < far < 1:
    raise ValueError(f"far={far!r} must be in (0, 1)")
  if positive.all() or not positive.any():
    raise ValueError("TAR@FAR needs genuine and impostor pairs; issame holds only one kind")
  scores = fold_scores(emb1, emb2, np.ones(emb1.shape[0], bool))
  neg = np.sort(scores[~positive])[::-1]  # descending
  t = neg[int(np.floor(far * neg.size))]
  return float(np.mean(scores[positive] > t))


def cosine_scores(emb1: Any, emb2: Any) -> np.ndarray:
  """Plain cosine of each pair (no fold centring): what a user computes for two faces. (N,)"""
  a = _as_float(emb1, "emb1")
  b = _as_float(emb2, "emb2")
  a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
  b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
  return np.sum(a * b, axis=1)


def deploy_threshold(emb1: Any, emb2: Any, issame: Any, thr_num: int = 10000) -> float:
  """A threshold to use outside the 10-fold protocol: the official sweep (same grid, mean of
  the best thresholds) run once on ALL pairs of the set, on `cosine_scores` (plain cosine
  of the L2-normalised flip-concat embeddings, NOT centred on a fold mean as the accuracy
  protocol's scores are). Two faces match when their cosine is above it."""
  scores = cosine_scores(emb1, emb2)
  return sweep_thresholds(scores, _positive_mask(issame, scores.shape[0]), thr_num)
