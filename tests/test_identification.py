"""Rank-k identification against hand-computed values (distractors included)."""
from __future__ import annotations

import numpy as np
import pytest

from askd_jax.evaluate import identification as ident


def _at(deg, r=1.0):
  t = np.deg2rad(deg)
  return [r * np.cos(t), r * np.sin(t)]


def test_rank_k_hand_computed():
  # probes at 0, 90, 180 degrees and one whose identity is not in the gallery
  probes = np.array([_at(0), _at(90, 3.0), _at(180), _at(270)])
  probe_labels = np.array([1, 2, 3, 4])
  gallery = np.array([_at(40), _at(10, 5.0), _at(80), _at(30), _at(170), _at(200), _at(105)])
  gallery_labels = np.array([1, -100, 2, -100, 3, 2, -100])
  # by hand: probe 0 sees distractors at 10 and 30 degrees before its mate (40) -> rank 3;
  # probe 1: mate at 80 (10 deg away) first -> rank 1; probe 2: mate at 170 -> rank 1;
  # probe 3: no mate -> never found (counted as a miss, as the official script does).
  got = ident.rank_k(probes, probe_labels, gallery, gallery_labels, ks=(1, 2, 3, 5))
  assert got == {"rank1": 0.5, "rank2": 0.5, "rank3": 0.75, "rank5": 0.75}
  # without the distractors probe 0 is a rank-1 hit
  keep = gallery_labels != -100
  got = ident.rank_k(probes, probe_labels, gallery[keep], gallery_labels[keep], ks=(1,))
  assert got == {"rank1": 0.75}


def test_rank_k_ties_and_chunks():
  g = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
  p = np.array([[1.0, 0.0]])
  # a distractor with the same score as the mate counts ahead only when it comes first
  assert ident.rank_k(p, [7], g, [-100, 7, 5], ks=(1, 2))["rank1"] == 0.0
  assert ident.rank_k(p, [7], g, [7, -100, 5], ks=(1, 2))["rank1"] == 1.0
  rng = np.random.default_rng(0)
  pe, ge = rng.normal(size=(37, 8)), rng.normal(size=(120, 8))
  pl, gl = rng.integers(0, 15, 37), np.where(rng.random(120) < 0.4, -100, rng.integers(0, 15, 120))
  ks = (1, 5, 10, 20)
  # brute force: stable sort per probe, mate among the first k
  pn = pe / np.linalg.norm(pe, axis=1, keepdims=True)
  gn = ge / np.linalg.norm(ge, axis=1, keepdims=True)
  order = np.argsort(-(pn @ gn.T), axis=1, kind="stable")
  want = {f"rank{k}": float(np.mean([pl[i] in gl[order[i, :k]] for i in range(37)])) for k in ks}
  assert want["rank1"] < want["rank20"]  # the data exercises several ranks
  for chunk in (1, 5, 256):
    got = ident.rank_k(pe, pl, ge, gl, ks, chunk=chunk)
    assert got == pytest.approx(want, abs=1e-12)


def test_rank_k_rejects_distractor_probe_and_shape_mismatch():
  with pytest.raises(ValueError, match="distractor"):
    ident.rank_k(np.ones((1, 2)), [-100], np.ones((1, 2)), [1])
  with pytest.raises(ValueError, match="disagree"):
    ident.rank_k(np.ones((2, 2)), [1], np.ones((1, 2)), [1])


def test_flip_average_of_flip_concat_embeddings():
  e = np.array([[1.0, 2.0, 3.0, 6.0], [0.0, -2.0, 4.0, 2.0]], np.float32)  # (B, 2D), D = 2
  np.testing.assert_array_equal(ident.flip_average(e), [[2.0, 4.0], [2.0, 0.0]])
  with pytest.raises(ValueError, match="flip-concat"):
    ident.flip_average(np.ones((2, 3)))
