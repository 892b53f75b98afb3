"""The vectorised 10-fold verification equals the official loop exactly."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import ref_official_verification as ref  # noqa: E402

from askd_jax.evaluate import verification as V  # noqa: E402


def _flags(issame):
  return np.where(issame, 1, -1)


def _check_equal_to_reference(e1, e2, issame, fold_ids=None, thr_num=10000):
  folds = V.equal_fold_ids(len(issame)) if fold_ids is None else fold_ids
  out = V.verification_accuracy(e1, e2, issame, fold_ids=fold_ids, thr_num=thr_num)
  accs, thrs = ref.ten_fold(e1, e2, _flags(issame), folds, thr_num=thr_num)
  np.testing.assert_array_equal(out["accuracies"], accs)
  np.testing.assert_array_equal(out["thresholds"], thrs)
  assert out["mean"] == np.mean(accs) and out["std"] == np.std(accs)
  return out


def test_random_features_equal_reference():
  rng = np.random.default_rng(0)
  n, d = 200, 16
  issame = rng.random(n) < 0.5
  e1 = rng.normal(size=(n, d)).astype(np.float32)
  # Positives correlated so the best threshold is not at an edge.
  e2 = np.where(issame[:, None], e1 + 0.8 * rng.normal(size=(n, d)),
                rng.normal(size=(n, d))).astype(np.float32)
  out = _check_equal_to_reference(e1, e2, issame)
  assert 0.6 < out["mean"] < 1.0


def _sign_pairs(rng, n_per_fold, nfolds=10, d=4):
  """Entries +-1, each fold holding (a, b) and (-a, -b): every fold mean is exactly 0, so
  scores are exactly (agree - disagree) / d and land on sweep thresholds (ties in s == t and
  in the accuracy maximum)."""
  e1, e2, same = [], [], []
  for _ in range(nfolds):
    for _ in range(n_per_fold // 2):
      a = rng.choice([-1.0, 1.0], size=d)
      flip = rng.random(d) < rng.choice([0.0, 0.25, 0.5, 0.75, 1.0])
      b = np.where(flip, -a, a)
      s = bool(np.mean(flip) < 0.5)
      e1 += [a, -a]
      e2 += [b, -b]
      same += [s, s]
  return np.array(e1, np.float32), np.array(e2, np.float32), np.array(same)


def test_exact_ties_equal_reference():
  rng = np.random.default_rng(1)
  e1, e2, issame = _sign_pairs(rng, n_per_fold=20)
  # Mislabel a few pairs so the maximum accuracy is reached on several plateaus.
  issame[::7] = ~issame[::7]
  out = _check_equal_to_reference(e1, e2, issame)
  scores = V.fold_scores(e1, e2, V.equal_fold_ids(len(issame)) != 0)
  assert set(np.unique(scores).tolist()) <= {-1.0, -0.5, 0.0, 0.5, 1.0}
  # The tie rule matters here: the first maximiser differs from the official mean.
  first = V.verification_accuracy(e1, e2, issame, tie="first")["thresholds"]
  assert np.any(first != out["thresholds"])


def test_reference_loop_equals_reference_broadcast():
  # The reference's block evaluation is the official per-threshold loop.
  rng = np.random.default_rng(8)
  n = 100
  e1 = rng.integers(-2, 3, size=(n, 3)).astype(np.float32) + 0.5
  e2 = rng.integers(-2, 3, size=(n, 3)).astype(np.float32) + 0.5
  flags = np.where(rng.random(n) < 0.5, 1, -1)
  folds = V.equal_fold_ids(n)
  a = ref.ten_fold(e1, e2, flags, folds, thr_num=300, loop=True)
  b = ref.ten_fold(e1, e2, flags, folds, thr_num=300, loop=False)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])


def test_quantised_features_equal_reference_small_sweep():
  rng = np.random.default_rng(2)
  n, d = 130, 3  # 130 % 10 == 0; few distinct values -> many equal scores
  e1 = rng.integers(-2, 3, size=(n, d)).astype(np.float32)
  e2 = rng.integers(-2, 3, size=(n, d)).astype(np.float32)
  e1[np.all(e1 == 0, 1)] = 1.0
  e2[np.all(e2 == 0, 1)] = -1.0
  issame = rng.random(n) < 0.4
  for thr_num in (3, 10, 100):
    _check_equal_to_reference(e1, e2, issame, thr_num=thr_num)


def test_hand_computed_threshold_and_perfect_features():
  # Positives (v, v), negatives (v, -v), all with +-v so the mean is exactly 0: training scores
  # are +1 / -1, every t in (-1, 1) is perfect, t = +-1 is not (strict inequalities).
  rng = np.random.default_rng(3)
  e1, e2, issame = [], [], []
  for i in range(100):
    v = rng.choice([-1.0, 1.0], size=8)
    s = i % 4 < 2
    w = v if s else -v
    e1 += [v, -v]
    e2 += [w, -w]
    issame += [s, s]
  e1, e2, issame = np.array(e1, np.float32), np.array(e2, np.float32), np.array(issame)
  out = V.verification_accuracy(e1, e2, issame)
  assert out["mean"] == 1.0 and out["std"] == 0.0
  # mean of k/10000 for k in -9999..9999 is 0; the first maximiser is -0.9999.
  np.testing.assert_allclose(out["thresholds"], 0.0, atol=1e-12)
  np.testing.assert_array_equal(V.verification_accuracy(e1, e2, issame, tie="first")["thresholds"],
                                np.full(10, -0.9999))


def test_perfect_random_features():
  rng = np.random.default_rng(4)
  n, d = 300, 32
  issame = np.arange(n) % 2 == 0
  e1 = rng.normal(size=(n, d)).astype(np.float32)
  e2 = np.where(issame[:, None], e1 + 1e-3 * rng.normal(size=(n, d)),
                rng.normal(size=(n, d))).astype(np.float32)
  out = V.verification_accuracy(e1, e2, issame)
  assert out["mean"] == 1.0 and out["std"] == 0.0
  assert np.all((out["thresholds"] > 0.0) & (out["thresholds"] < 1.0))


def test_agedb_fold_rule_and_custom_folds():
  np.testing.assert_array_equal(V.agedb_fold_ids(6000), V.equal_fold_ids(6000))
  np.testing.assert_array_equal(np.bincount(V.agedb_fold_ids(6000)), np.full(10, 600))
  np.testing.assert_array_equal(np.bincount(V.equal_fold_ids(7000)), np.full(10, 700))
  np.testing.assert_array_equal(np.bincount(V.equal_fold_ids(205)), [21] * 5 + [20] * 5)
  rng = np.random.default_rng(5)
  n, d = 120, 8
  issame = rng.random(n) < 0.5
  e1 = rng.normal(size=(n, d)).astype(np.float32)
  e2 = np.where(issame[:, None], e1 + rng.normal(size=(n, d)),
                rng.normal(size=(n, d))).astype(np.float32)
  interleaved = np.arange(n) % 10
  a = _check_equal_to_reference(e1, e2, issame, fold_ids=interleaved)
  b = V.verification_accuracy(e1, e2, issame)
  assert not np.array_equal(a["accuracies"], b["accuracies"])
  # The AgeDB rule with a smaller fold size: pair index // 12 is the same as equal folds here.
  c = V.verification_accuracy(e1, e2, issame, fold_ids=V.agedb_fold_ids(n, fold_size=12))
  np.testing.assert_array_equal(c["accuracies"], b["accuracies"])


def test_full_size_agedb_equals_reference():
  # 6,000 pairs x 20,001 thresholds, AgeDB folds: the acceptance case of issue 3.
  rng = np.random.default_rng(6)
  n, d = 6000, 64
  issame = np.arange(n) % 2 == 0
  e1 = rng.normal(size=(n, d)).astype(np.float32)
  e2 = np.where(issame[:, None], e1 + 1.5 * rng.normal(size=(n, d)),
                rng.normal(size=(n, d))).astype(np.float32)
  out = _check_equal_to_reference(e1, e2, issame, fold_ids=V.agedb_fold_ids(n))
  assert 0.7 < out["mean"] < 1.0


def test_flags_and_bool_agree_and_bad_input():
  rng = np.random.default_rng(7)
  e1 = rng.normal(size=(50, 4)).astype(np.float32)
  e2 = rng.normal(size=(50, 4)).astype(np.float32)
  issame = rng.random(50) < 0.5
  a = V.verification_accuracy(e1, e2, issame)
  b = V.verification_accuracy(e1, e2, np.where(issame, 1, -1))
  np.testing.assert_array_equal(a["accuracies"], b["accuracies"])
  with pytest.raises(ValueError, match="same shape"):
    V.verification_accuracy(e1, e2[:, :3], issame)
  with pytest.raises(ValueError, match="issame"):
    V.verification_accuracy(e1, e2, np.full(50, 2))
  bad = e1.copy()
  bad[3] = np.nan
  with pytest.raises(ValueError, match="not finite"):
    V.verification_accuracy(bad, e2, issame)


def test_flip_concat_embed_numpy_and_jax():
  jnp = pytest.importorskip("jax.numpy")
  x = np.arange(2 * 3 * 4 * 1, dtype=np.float32).reshape(2, 3, 4, 1)  # (B, H, W, C)
  w = np.array([1.0, 10.0, 100.0, 1000.0], np.float32)  # position-sensitive along W

  def embed(im):
    return (im[..., 0] * w).sum(axis=1)  # (B, W)

  out = V.flip_concat_embed(embed, x)
  assert out.shape == (2, 8)
  np.testing.assert_array_equal(out[:, :4], embed(x))
  np.testing.assert_array_equal(out[:, 4:], embed(x[:, :, ::-1]))
  assert not np.array_equal(out[:, :4], out[:, 4:])
  out_j = V.flip_concat_embed(lambda im: embed(im), jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(out_j), out)


def test_flip_concat_embed_flips_before_degrading():
  """The official order (dataset/agedb.py): flip the HR image, then degrade each view. A
  degradation that does not commute with the flip (keep the left half) tells the orders
  apart."""
  x = np.arange(2 * 1 * 4 * 1, dtype=np.float32).reshape(2, 1, 4, 1)
  left = lambda im: np.repeat(im[:, :, :2], 2, axis=2)  # not flip-equivariant
  out = V.flip_concat_embed(lambda im: im[:, 0, :, 0], x, degrade=left)
  np.testing.assert_array_equal(out[:, 4:], left(x[:, :, ::-1])[:, 0, :, 0])
  assert not np.array_equal(out[:, 4:], left(x)[:, :, ::-1][:, 0, :, 0])


def test_deploy_threshold_is_the_sweep_on_plain_cosine_of_all_pairs():
  # pairs at angles: cosines 1, 0.8, 0.6 (same person) and 0.2, -0.4 (different)
  cos = np.array([1.0, 0.8, 0.6, 0.2, -0.4])
  e1 = np.tile([[1.0, 0.0]], (5, 1)) * 3.0  # norms do not matter
  e2 = np.stack([cos, np.sqrt(1 - cos ** 2)], axis=1)
  issame = np.array([True, True, True, False, False])
  np.testing.assert_allclose(V.cosine_scores(e1, e2), cos, atol=1e-6)
  # every t in (0.2, 0.6) separates them; the grid's best are 0.2001 .. 0.5999 (mean 0.4)
  assert V.deploy_threshold(e1, e2, issame) == pytest.approx(0.4, abs=1e-9)
