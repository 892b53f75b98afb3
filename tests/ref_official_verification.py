"""Reference: the official A-SKD 10-fold verification written as a plain loop.

Re-implemented (not copied) from the procedure of gist-ailab/teaching-where-to-look
evaluation/eval_agedb.py: flags are +1 / -1, every threshold of arange(-thr_num, thr_num+1)
/ thr_num is tried one by one, and the chosen threshold is the mean of all thresholds that
reach the best training accuracy.
"""
from __future__ import annotations

import numpy as np


def accuracy(scores, flags, threshold):
  correct = 0
  for s, f in zip(scores, flags):
    if f == 1 and s > threshold:
      correct += 1
    elif f == -1 and s < threshold:
      correct += 1
  return 1.0 * correct / len(scores)


def accuracy_np(scores, flags, threshold):
  # The same count with numpy (the official expression), for the long sweeps.
  p = np.sum(scores[flags == 1] > threshold)
  n = np.sum(scores[flags == -1] < threshold)
  return 1.0 * (p + n) / len(scores)


def best_threshold(scores, flags, thr_num, loop=False):
  """Mean of the thresholds with the best accuracy. loop=True tries them one by one as the
  official code; otherwise the same expression is evaluated for a block of thresholds at a
  time (a broadcast of the loop body, for speed)."""
  thresholds = np.arange(-thr_num, thr_num + 1) * 1.0 / thr_num
  accs = np.zeros(2 * thr_num + 1)
  if loop:
    for i in range(2 * thr_num + 1):
      accs[i] = accuracy_np(scores, flags, thresholds[i])
  else:
    pos, neg = scores[flags == 1], scores[flags == -1]
    for start in range(0, thresholds.size, 1024):
      t = thresholds[start:start + 1024, None]
      p = np.sum(pos[None, :] > t, axis=1)
      n = np.sum(neg[None, :] < t, axis=1)
      accs[start:start + 1024] = 1.0 * (p + n) / len(scores)
  return np.mean(thresholds[accs == np.max(accs)])


def ten_fold(feat_l, feat_r, flags, folds, nfolds=10, thr_num=10000, loop=False):
  """feat_l, feat_r: (N, D); flags: (N,) +1/-1; folds: (N,) ints. Returns (accs, thresholds)."""
  accs = np.zeros(nfolds)
  thrs = np.zeros(nfolds)
  for i in range(nfolds):
    val = folds != i
    test = folds == i
    mu = np.mean(np.concatenate((feat_l[val, :], feat_r[val, :]), 0), 0)
    mu = np.expand_dims(mu, 0)
    fl = feat_l - mu
    fr = feat_r - mu
    fl = fl / np.expand_dims(np.sqrt(np.sum(np.power(fl, 2), 1)), 1)
    fr = fr / np.expand_dims(np.sqrt(np.sum(np.power(fr, 2), 1)), 1)
    scores = np.sum(np.multiply(fl, fr), 1)
    thrs[i] = best_threshold(scores[val], flags[val], thr_num, loop)
    accs[i] = accuracy(scores[test], flags[test], thrs[i])
  return accs, thrs
