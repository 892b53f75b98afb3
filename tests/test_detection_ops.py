"""Detection ops on hand-made boxes whose answers are worked out in the comments."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from askd_jax.detection import boxes as B
from askd_jax.detection.assign import max_iou_assign
from askd_jax.detection.losses import detection_loss, diou_loss, sigmoid_focal_loss
from askd_jax.detection.postprocess import nms, postprocess

LOG2 = math.log(2.0)


def test_iou_matrix_and_aligned():
  a = jnp.array([[0., 0., 10., 10.], [0., 0., 10., 5.]])
  b = jnp.array([[5., 5., 15., 15.], [20., 20., 30., 30.], [0., 0., 10., 10.]])
  m = np.asarray(B.iou_matrix(a, b))
  # [0,0,10,10] vs [5,5,15,15]: inter 25, union 175 -> 1/7; disjoint -> 0; itself -> 1.
  # [0,0,10,5] vs [5,5,15,15]: touch on an edge -> 0; vs [0,0,10,10]: 50/100.
  np.testing.assert_allclose(m, [[1 / 7, 0, 1], [0, 0, 0.5]], atol=1e-6)
  np.testing.assert_allclose(B.iou_aligned(a, b[jnp.array([0, 2])]), [1 / 7, 0.5], atol=1e-6)


def test_diou_loss_hand_values():
  pred = jnp.array([[0., 0., 2., 2.], [0., 0., 1., 1.]])
  tgt = jnp.array([[1., 0., 3., 2.], [3., 0., 4., 1.]])
  # 1: inter 2, union 6 -> IoU 1/3; centres (1,1),(2,1): d^2 1; enclosing 3x2: c^2 13.
  # 2: disjoint, IoU 0; centres 3 apart: d^2 9; enclosing 4x1: c^2 17.
  expected = [1 - (1 / 3 - 1 / 13), 1 + 9 / 17]
  np.testing.assert_allclose(diou_loss(pred, tgt), expected, rtol=1e-5)
  np.testing.assert_allclose(diou_loss(tgt, tgt), [0, 0], atol=1e-5)


def test_focal_loss_hand_values():
  logits = jnp.array([0., 0., math.log(3.0), math.log(3.0)])   # p = .5, .5, .75, .75
  targets = jnp.array([1., 0., 1., 0.])
  # alpha_t * (1 - p_t)^2 * -log(p_t)
  expected = [0.25 * 0.25 * LOG2, 0.75 * 0.25 * LOG2,
              0.25 * 0.25 ** 2 * -math.log(0.75), 0.75 * 0.75 ** 2 * -math.log(0.25)]
  np.testing.assert_allclose(sigmoid_focal_loss(logits, targets), expected, rtol=1e-6)
  # Large logits stay finite (stable BCE).
  assert np.all(np.isfinite(sigmoid_focal_loss(jnp.array([200., -200.]), jnp.array([0., 1.]))))


def test_encode_decode_round_trip_and_clamps():
  anchor = jnp.array([[0., 0., 10., 20.]])   # centre (5, 10), 10 x 20
  gt = jnp.array([[2., 4., 22., 24.]])       # centre (12, 14), 20 x 20
  d = B.encode(anchor, gt)
  # (0.7, 0.2, log 2, 0) divided by the stds (0.1, 0.1, 0.2, 0.2)
  np.testing.assert_allclose(d, [[7.0, 2.0, LOG2 / 0.2, 0.0]], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(B.decode(anchor, d), gt, atol=1e-4)
  rng = np.random.default_rng(0)
  xy = rng.uniform(0, 50, (64, 2))
  boxes = jnp.asarray(np.concatenate([xy, xy + rng.uniform(2, 40, (64, 2))], 1), jnp.float32)
  anchors = jnp.roll(boxes, 1, axis=0)
  np.testing.assert_allclose(B.decode(anchors, B.encode(anchors, boxes)), boxes, atol=1e-3)
  # dw clamped at log(1000/16): width 10 * 62.5; clip to (H, W) = (30, 40).
  big = B.decode(anchor, jnp.array([[0., 0., 100., 0.]]))
  np.testing.assert_allclose(big[0, 2] - big[0, 0], 625.0, rtol=1e-5)
  clipped = B.decode(anchor, jnp.array([[0., 0., 100., 0.]]), max_shape=(30, 40))
  np.testing.assert_allclose(clipped, [[0., 0., 40., 20.]], atol=1e-4)


def test_assigner_tinaface_thresholds():
  gt = jnp.array([[0., 0., 10., 10.], [20., 0., 30., 10.], [40., 0., 50., 10.],
                  [42., 0., 52., 10.], [0., 0., 10., 10.]])
  valid = jnp.array([True, True, True, True, False])   # the padded row never matches
  anchors = jnp.array([
      [0., 0., 10., 10.],      # IoU 1 with gt0 -> positive, gt0
      [5., 0., 15., 10.],      # 1/3 with gt0 < 0.35 -> negative
      [18., 0., 28., 10.],     # 80/120 = 2/3 with gt1 -> positive, gt1
      [100., 100., 110., 110.],  # no overlap -> negative
      [40.5, 0., 50.5, 10.],   # 95/105 with gt2, 85/115 with gt3 (both gts' best anchor):
  ])                           # low-quality step, later gt wins -> gt3 (mmdet behaviour)
  a = jax.jit(max_iou_assign)(anchors, gt, valid)
  np.testing.assert_array_equal(a.positive, [True, False, True, False, True])
  np.testing.assert_array_equal(a.negative, [False, True, False, True, False])
  np.testing.assert_array_equal(np.asarray(a.gt_index)[np.asarray(a.positive)], [0, 1, 3])
  np.testing.assert_allclose(a.max_iou, [1, 1 / 3, 2 / 3, 0, 95 / 105], rtol=1e-5)


def test_assigner_ignore_band_low_quality_and_empty():
  gt = jnp.array([[0., 0., 10., 10.], [100., 0., 110., 10.]])
  anchors = jnp.array([[0., 0., 10., 10.],    # 1.0 -> positive
                       [0., 0., 10., 4.5],    # 0.45: between neg 0.4 and pos 0.5 -> ignored
                       [50., 50., 60., 60.],  # 0 -> negative
                       [105., 0., 115., 10.]])  # 1/3 = gt1's best >= min_pos 0.3 -> positive
  kw = dict(pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.3)
  assign = jax.jit(max_iou_assign, static_argnames=("pos_iou_thr", "neg_iou_thr", "min_pos_iou",
                                                     "match_low_quality"))
  a = assign(anchors, gt, jnp.array([True, True]), **kw)
  np.testing.assert_array_equal(a.positive, [True, False, False, True])
  np.testing.assert_array_equal(a.negative, [False, False, True, False])
  np.testing.assert_array_equal(a.gt_index[jnp.array([0, 3])], [0, 1])
  a = assign(anchors, gt, jnp.array([True, True]), match_low_quality=False, **kw)
  np.testing.assert_array_equal(a.positive, [True, False, False, False])
  np.testing.assert_array_equal(a.negative, [False, False, True, True])
  a = jax.jit(max_iou_assign)(anchors, gt, jnp.array([False, False]))  # no valid gt
  assert not np.any(a.positive) and np.all(a.negative)


def test_nms_greedy_hand_case():
  boxes = jnp.array([[0., 0., 10., 10.],   # .9 kept
                     [3., 0., 13., 10.],   # .8 IoU 70/130 with box 0 -> suppressed
                     [6., 0., 16., 10.],   # .7 IoU .25 with 0; .54 with 1, but 1 is gone -> kept
                     [20., 0., 30., 10.],  # .6 kept
                     [22., 0., 32., 10.],  # .5 IoU 80/120 with 3 -> suppressed
                     [50., 50., 60., 60.]])  # 1.0 but invalid (below threshold) -> never
  scores = jnp.array([.9, .8, .7, .6, .5, 1.0])
  valid = jnp.array([True] * 5 + [False])
  b, s, v = jax.jit(nms, static_argnums=(3, 4))(boxes, scores, valid, 0.4, 5)
  np.testing.assert_array_equal(v, [True, True, True, False, False])
  np.testing.assert_allclose(s, [.9, .7, .6, 0, 0])
  np.testing.assert_allclose(b[:3], boxes[jnp.array([0, 2, 3])])
  b, s, v = jax.jit(nms, static_argnums=(3, 4))(boxes, scores, valid, 0.4, 2)   # max_det cuts the tail
  np.testing.assert_allclose(s, [.9, .7])
  # threshold is strict (IoU > thr): at thr 0.25 box 2 (IoU exactly .25 with 0) survives
  _, s, _ = jax.jit(nms, static_argnums=(3, 4))(boxes, scores, valid, 0.25, 5)
  np.testing.assert_allclose(s, [.9, .7, .6, 0, 0])


def test_postprocess_scores_threshold_scale_and_height():
  anchors = jnp.array([[0., 0., 10., 10.], [2., 0., 12., 10.], [30., 30., 36., 34.],
                       [50., 50., 70., 70.]])
  cls = jnp.array([[0., -1., 0., -10.]])[..., None]
  iou = jnp.zeros((1, 4, 1))
  out = {"cls": cls, "box": jnp.zeros((1, 4, 4)), "iou": iou}
  r = jax.jit(lambda o: postprocess(o, anchors, (64, 64), max_det=4))(out)
  # score = sig(c)^0.8 * sig(i)^1.2: anchors 0 and 2 -> 0.25; anchor 1 -> sig(-1)^.8 * .5^1.2
  # but IoU 80/120 with anchor 0 -> suppressed; anchor 3 -> ~4.5e-5 * .435 < 0.02 dropped.
  np.testing.assert_array_equal(r["valid"], [[True, True, False, False]])
  np.testing.assert_allclose(r["scores"][0, :2], [0.25, 0.25], rtol=1e-5)
  np.testing.assert_allclose(r["boxes"][0, :2], anchors[jnp.array([0, 2])], atol=1e-4)
  # alpha .5 -> cls * iou = .25; scale 2 -> boxes halved (original-image pixels);
  # min_height 4 applies there: anchor 0 (height 10 / 2 = 5) stays, anchor 2 (4 / 2 = 2) goes.
  r = jax.jit(lambda o: postprocess(o, anchors, 64, max_det=4, alpha=0.5,
                                    scale=jnp.array([2.0]), min_height=4.0))(out)
  np.testing.assert_array_equal(r["valid"], [[True, False, False, False]])
  np.testing.assert_allclose(r["scores"][0, 0], 0.25, rtol=1e-5)
  np.testing.assert_allclose(r["boxes"][0, 0], [0, 0, 5, 5], atol=1e-4)


def _outputs(cls, box, iou):
  return {"cls": jnp.asarray(cls)[..., None], "box": jnp.asarray(box),
          "iou": jnp.asarray(iou)[..., None]}


def test_detection_loss_hand_values():
  anchors = jnp.array([[0., 0., 10., 10.], [50., 50., 60., 60.]])
  gt = jnp.array([[[0., 0., 10., 10.], [0., 0., 0., 0.]],   # image 0: one gt + padding
                  [[0., 0., 0., 0.], [0., 0., 0., 0.]]])    # image 1: no gt
  valid = jnp.array([[True, False], [False, False]])
  # anchor 0 of image 0 positive, everything else negative; num_pos = 1 + max(0, 1) = 2.
  # Image 0's box delta dx = 1 (x 0.1 std x 10 px) moves it to [1, 0, 11, 10]:
  # IoU 90/110 = 9/11, DIoU = 9/11 - 1/221 (centres 1 apart, enclosing 11x10).
  box = jnp.zeros((2, 2, 4)).at[0, 0, 0].set(1.0)
  out = _outputs(jnp.zeros((2, 2)), box, jnp.ones((2, 2)))
  loss, m = jax.jit(detection_loss)(out, anchors, gt, valid)
  f_pos, f_neg = 0.0625 * LOG2, 0.1875 * LOG2
  e_cls = (f_pos + 3 * f_neg) / 2
  e_box = (1 - (9 / 11 - 1 / 221)) / 2
  e_iou = (1 - 9 / 11 + math.log1p(math.exp(-1))) / 2   # BCE(logit 1, target 9/11)
  np.testing.assert_allclose(m["loss_cls"], e_cls, rtol=1e-5)
  np.testing.assert_allclose(m["loss_box"], e_box, rtol=1e-5)
  np.testing.assert_allclose(m["loss_iou"], e_iou, rtol=1e-5)
  np.testing.assert_allclose(loss, e_cls + 2 * e_box + e_iou, rtol=1e-5)
  np.testing.assert_allclose(m["num_pos"], 0.5)
  np.testing.assert_allclose(m["pos_iou"], 9 / 11, rtol=1e-5)


def test_detection_loss_gradients_finite_and_iou_target_detached():
  anchors = jnp.array([[0., 0., 10., 10.], [50., 50., 60., 60.], [5., 5., 25., 25.]])
  gt = jnp.array([[[1., 1., 12., 11.], [0., 0., 0., 0.]], [[0., 0., 0., 0.]] * 2])
  valid = jnp.array([[True, False], [False, False]])
  rng = np.random.default_rng(1)
  out = _outputs(rng.normal(size=(2, 3)), rng.normal(size=(2, 3, 4)) * 0.1,
                 rng.normal(size=(2, 3)))
  grads = jax.jit(jax.grad(lambda o: detection_loss(o, anchors, gt, valid)[0]))(out)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert np.any(np.asarray(grads["box"]) != 0)
  # With the box term off, the box deltas only reach the loss through the IoU target,
  # which is gradient-stopped as in vedadet (detach=True).
  cfg = {"box_weight": 0.0}
  g = jax.jit(jax.grad(lambda o: detection_loss(o, anchors, gt, valid, cfg)[0]))(out)
  np.testing.assert_array_equal(g["box"], 0.0)
  assert np.any(np.asarray(g["iou"]) != 0)
