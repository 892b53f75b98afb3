"""WIDER FACE AP: hand-computed cases and a loop transcription of the official steps."""
from __future__ import annotations

import numpy as np
import pytest

from askd_jax.evaluate import widerface as W

D = W.DIFFICULTIES


def _gt(name, boxes, easy, medium, hard):
  return W.ImageGT(name, np.array(boxes, np.float64).reshape(-1, 4),
                   {"easy": np.array(easy, int), "medium": np.array(medium, int),
                    "hard": np.array(hard, int)})


def _xyxy(x, y, w, h, s):
  return [x, y, x + w, y + h, s]


def _hand_ap(labels, n_faces):
  """VOC all-point AP from a hand-listed detection sequence ('tp', 'fp', 'ign'), written
  independently of the code under test."""
  tp = fp = 0
  rec, prec = [], []
  for lab in labels:
    tp += lab == "tp"
    fp += lab == "fp"
    if tp + fp:
      rec.append(tp / n_faces)
      prec.append(tp / (tp + fp))
  ap, best = 0.0, 0.0
  # Sum over recall steps of (step) x (best precision at this recall or beyond).
  for i in range(len(rec)):
    prev = rec[i - 1] if i else 0.0
    if rec[i] > prev:
      ap += (rec[i] - prev) * max(prec[i:])
  return ap


def test_perfect_detections_ap_one():
  rng = np.random.default_rng(0)
  gts, preds = [], {}
  for i in range(4):
    g = rng.integers(0, 200, size=(5, 2)).astype(float)
    wh = rng.integers(5, 40, size=(5, 2)).astype(float)
    boxes = np.concatenate([g, wh], 1)
    gts.append(_gt(f"0--Ev/img_{i}", boxes, [0, 1], [0, 1, 2], [0, 1, 2, 3]))  # box 4 ignored
    scores = rng.random(5)
    preds[f"0--Ev/img_{i}.jpg"] = np.array([_xyxy(*b, s) for b, s in zip(boxes, scores)])
  ap = W.evaluate_widerface(preds, gts)
  assert set(ap) == set(D)
  for d in D:
    assert ap[d] == pytest.approx(1.0, abs=1e-12)


def _constructed_case():
  # Image A: g0 kept everywhere, g1 medium+hard, g2 hard only, g3 never kept (invalid).
  a = _gt("1--A/a", [[0, 0, 10, 10], [100, 100, 10, 10], [200, 200, 10, 10], [300, 300, 10, 10]],
          [0], [0, 1], [0, 1, 2])
  # Image B: h0 kept everywhere, h1 medium+hard.
  b = _gt("1--A/b", [[0, 0, 20, 20], [50, 50, 20, 20]], [0], [0, 1], [0, 1])
  # Image C: one face kept everywhere, never detected (a miss).
  c = _gt("2--C/c", [[10, 10, 30, 30]], [0], [0], [0])
  preds = {
      "1--A/a": np.array([
          _xyxy(0, 0, 10, 10, 1.0),        # p1: g0
          _xyxy(300, 300, 10, 10, 0.8),    # p2: g3, ignored box
          _xyxy(200, 200, 10, 10, 0.7),    # p6: g2
          _xyxy(0, 0, 10, 10, 0.6),        # p3: duplicate of g0
          _xyxy(100, 100, 10, 10, 0.3),    # p4: g1
          _xyxy(500, 500, 10, 10, 0.1),    # p5: nothing
      ]),
      "1--A/b": np.array([
          _xyxy(50, 50, 20, 20, 0.9),      # q1: h1
          _xyxy(0, 0, 20, 20, 0.5),        # q2: h0
          _xyxy(12, 12, 20, 20, 0.0),      # q3: IoU(h0) = 81/(441+441-81) < 0.5
      ]),
      "2--C/c": np.zeros((0, 5)),
      # An image without ground truth: skipped, its detection is not a false positive.
      "3--D/d": np.array([_xyxy(0, 0, 5, 5, 0.95)]),
  }
  return [a, b, c], preds


def test_hand_computed_hits_misses_duplicates_ignored():
  gts, preds = _constructed_case()
  ap = W.evaluate_widerface(preds, gts)
  # Detections in score order: p1 1.0, q1 .9, p2 .8, p6 .7, p3 .6, q2 .5, p4 .3, p5 .1, q3 0.
  seq = {
      "easy": ["tp", "ign", "ign", "ign", "fp", "tp", "ign", "fp", "fp"],  # faces g0 h0 c
      "medium": ["tp", "tp", "ign", "ign", "fp", "tp", "tp", "fp", "fp"],  # g0 g1 h0 h1 c
      "hard": ["tp", "tp", "ign", "tp", "fp", "tp", "tp", "fp", "fp"],  # g0 g1 g2 h0 h1 c
  }
  faces = {"easy": 3, "medium": 5, "hard": 6}
  # By hand: easy 1/3 * 1 + 1/3 * 2/3 = 5/9; medium .4 * 1 + .4 * .8 = .72;
  # hard 3/6 * 1 + 2/6 * 5/6 = 7/9 (recall steps of 1/6; precision envelope 1, then 5/6).
  expected = {"easy": 5 / 9, "medium": 0.72, "hard": 7 / 9}
  for d in D:
    assert _hand_ap(seq[d], faces[d]) == pytest.approx(expected[d], abs=1e-12)
    assert ap[d] == pytest.approx(expected[d], abs=1e-12), d


def test_xywh_input_unsorted_input_and_key_forms_agree():
  gts, preds = _constructed_case()
  ref = W.evaluate_widerface(preds, gts)
  xywh = {}
  for k, p in preds.items():
    q = p.copy()
    q[:, 2:4] -= q[:, 0:2]
    xywh[k + ".jpg"] = q[::-1]  # reversed order: the evaluator sorts by score
  assert W.evaluate_widerface(xywh, gts, box_format="xywh") == pytest.approx(ref, abs=1e-12)


def test_iou_plus_one_convention_and_threshold():
  # gt 0,0,10,10 (xywh) -> x2 = 10: 11 x 11 pixels. Detection 0,0,10,4.6 (xyxy): 11 x 5.6.
  # IoU (+1 convention) = 61.6 / 121 = 0.509 >= 0.5 (plain geometry would give 0.46: a miss).
  np.testing.assert_allclose(W.iou_plus_one(np.array([[0, 0, 10, 4.6]]), np.array([[0, 0, 10, 10]])),
                             [[61.6 / 121]])
  gts = [_gt("e/a", [[0, 0, 10, 10]], [0], [0], [0])]
  ap = W.evaluate_widerface({"e/a": np.array([[0, 0, 10, 4.6, 1.0], [50, 50, 60, 60, 0.0]])}, gts)
  assert ap["easy"] == pytest.approx(1.0)
  ap = W.evaluate_widerface({"e/a": np.array([[0, 0, 10, 4.0, 1.0], [50, 50, 60, 60, 0.0]])}, gts)
  assert ap["easy"] == 0.0  # 55/121 < 0.5: both detections are false positives


def test_official_score_normalisation_quirk():
  out = W.normalize_scores({"a": np.array([[0, 0, 1, 1, 2.0]]), "b": np.array([[0, 0, 1, 1, 3.0]])})
  # min starts at 1 and max at 0: min(1, 2, 3) = 1, max = 3.
  assert out["a"][0, 4] == 0.5 and out["b"][0, 4] == 1.0
  out = W.normalize_scores({"a": np.array([[0, 0, 1, 1, 0.2], [0, 0, 1, 1, 0.6]])})
  np.testing.assert_allclose(out["a"][:, 4], [0.0, 1.0])


def test_missing_predictions_and_bad_shape():
  gts, preds = _constructed_case()
  del preds["2--C/c"]
  with pytest.raises(KeyError, match="2--C/c"):
    W.evaluate_widerface(preds, gts)
  ap = W.evaluate_widerface(preds, gts, allow_missing=True)
  assert ap["hard"] == pytest.approx(7 / 9)
  with pytest.raises(ValueError, match=r"\(N, 5\)"):
    W.evaluate_widerface({"e/a": np.zeros((3, 4))}, [_gt("e/a", [[0, 0, 1, 1]], [0], [0], [0])])


def _official_loop(preds, gts, iou_thresh=0.5, thresh_num=1000):
  """The official per-detection / per-threshold loops (preds xyxy, sorted by score)."""
  preds = W.normalize_scores(preds)
  aps = {}
  for d in D:
    pr = np.zeros((thresh_num, 2))
    count = 0
    for img in gts:
      keep = np.asarray(img.keep[d], int)
      count += len(keep)
      p = preds[img.name]
      if len(img.boxes) == 0 or len(p) == 0:
        continue
      g = img.boxes.copy()
      g[:, 2:] += g[:, :2]
      is_kept = np.zeros(len(g))
      is_kept[keep] = 1
      recall_list = np.zeros(len(g))
      proposal = np.ones(len(p))
      pred_recall = np.zeros(len(p))
      for h in range(len(p)):
        ov = []
        for k in range(len(g)):
          iw = min(p[h, 2], g[k, 2]) - max(p[h, 0], g[k, 0]) + 1
          ih = min(p[h, 3], g[k, 3]) - max(p[h, 1], g[k, 1]) + 1
          if iw > 0 and ih > 0:
            ua = ((p[h, 2] - p[h, 0] + 1) * (p[h, 3] - p[h, 1] + 1)
                  + (g[k, 2] - g[k, 0] + 1) * (g[k, 3] - g[k, 1] + 1) - iw * ih)
            ov.append(iw * ih / ua)
          else:
            ov.append(0.0)
        j = int(np.argmax(ov))
        if ov[j] >= iou_thresh:
          if is_kept[j] == 0:
            recall_list[j] = -1
            proposal[h] = -1
          elif recall_list[j] == 0:
            recall_list[j] = 1
        pred_recall[h] = np.sum(recall_list == 1)
      for t in range(thresh_num):
        thr = 1 - (t + 1) / thresh_num
        idx = np.where(p[:, 4] >= thr)[0]
        if len(idx):
          r = idx[-1]
          pr[t, 0] += np.sum(proposal[:r + 1] == 1)
          pr[t, 1] += pred_recall[r]
    with np.errstate(invalid="ignore", divide="ignore"):
      prec = pr[:, 1] / pr[:, 0]
    rec = pr[:, 1] / count
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
      mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    aps[d] = float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))
  return aps


def test_random_scenes_equal_official_loop():
  rng = np.random.default_rng(1)
  gts, preds = [], {}
  for i in range(12):
    n = int(rng.integers(0, 6))
    boxes = np.concatenate([rng.integers(0, 60, (n, 2)), rng.integers(2, 25, (n, 2))], 1).astype(float)
    hard = np.nonzero(rng.random(n) < 0.8)[0]
    medium = hard[rng.random(hard.size) < 0.7]
    easy = medium[rng.random(medium.size) < 0.6]
    gts.append(_gt(f"ev/{i}", boxes, easy, medium, hard))
    m = int(rng.integers(0, 9))
    jitter = rng.normal(0, 2.5, (m, 4))
    src = boxes[rng.integers(0, n, m)] if n else np.zeros((m, 4))
    xyxy = np.concatenate([src[:, :2], src[:, :2] + src[:, 2:]], 1) + jitter
    scores = np.round(rng.random(m) * 3 - 1, 2)  # outside [0, 1] and with ties
    p = np.concatenate([xyxy, scores[:, None]], 1)
    preds[f"ev/{i}"] = p[np.argsort(-p[:, 4], kind="stable")]
  fast = W.evaluate_widerface(preds, gts)
  slow = _official_loop(preds, gts)
  assert fast == pytest.approx(slow, abs=1e-12)
  assert all(0.0 < fast[d] < 1.0 for d in D)


def test_official_prediction_files_round_trip(tmp_path):
  gts, preds = _constructed_case()
  W.write_official_predictions(preds, str(tmp_path))
  back = W.read_official_predictions(str(tmp_path))
  assert set(back) == set(preds)
  ap = W.evaluate_widerface(back, gts, box_format="xywh")
  assert ap == pytest.approx(W.evaluate_widerface(preds, gts), abs=1e-9)
