"""TinaFace-CBAM: full-size shapes by eval_shape, anchors by hand, a tiny model trained 2 steps."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from askd_jax.detection.losses import detection_loss
from askd_jax.detection.postprocess import postprocess
from askd_jax.models.tinaface import tinaface_cbam


def shapes(model, h, w=None, batch=1):
  return jax.eval_shape(lambda: model.init_with_output(
      jax.random.key(0), jnp.zeros((batch, h, w or h, 3)), train=False))


def test_full_size_640_shapes():
  model = tinaface_cbam()
  (out, f), variables = shapes(model, 640)
  # 6 levels at strides 4..128 -> 160, 80, 40, 20, 10, 5 cells, 3 anchors each.
  n = 3 * sum(s * s for s in (160, 80, 40, 20, 10, 5))
  assert n == 102_375
  assert out["cls"].shape == (1, n, 1) and out["iou"].shape == (1, n, 1)
  assert out["box"].shape == (1, n, 4)
  assert all(v.dtype == jnp.float32 for v in out.values())
  assert model.anchors_for(640).shape == (n, 4)
  assert len(f.channel_maps) == len(f.spatial_maps) == 16
  assert [s.shape for s in f.stages] == [(1, 160, 160, 256), (1, 80, 80, 512),
                                         (1, 40, 40, 1024), (1, 20, 20, 2048)]
  assert f.embedding.shape == (1, 2048)
  p = variables["params"]
  count = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))
  # Head: 8 tower convs 3x3x256x256 + a BN per level (6), cls 3x3x256x3 + 3, box 3x3x256x12
  # + 12, iou like cls.
  assert count(p["head"]) == (8 * (9 * 256 * 256 + 6 * 2 * 256) + 2 * (9 * 256 * 3 + 3)
                              + 9 * 256 * 12 + 12)
  # Inception (shared): 3x3 256->128, 256->64, then three 64->64, each + a BN per level.
  assert count(p["inception"]) == ((9 * 256 * 128 + 6 * 256) + (9 * 256 * 64 + 6 * 128)
                                   + 3 * (9 * 64 * 64 + 6 * 128))
  # FPN: laterals 1x1 from 256/512/1024/2048, four 3x3 outputs, P6 3x3 from 2048, P7 3x3.
  lat = sum(c * 256 + 512 for c in (256, 512, 1024, 2048))
  assert count(p["fpn"]) == lat + 4 * (9 * 256 * 256 + 512) + (9 * 2048 * 256 + 512) + (9 * 256 * 256 + 512)


def test_anchors_by_hand():
  a = tinaface_cbam().anchors_for(640)
  r = math.sqrt(1.3)
  for k in range(3):   # first cell of level 0: centre (0, 0), size 4 * 2^(4/3 + k/3)
    s = 4 * 2 ** (4 / 3 + k / 3)
    np.testing.assert_allclose(a[k], [-s / r / 2, -s * r / 2, s / r / 2, s * r / 2], rtol=1e-5)
  # level 1 (stride 8, 80x80 cells), cell (y=1, x=2), anchor 1: centre (16, 8)
  i = 3 * 160 * 160 + 3 * (1 * 80 + 2) + 1
  s = 8 * 2 ** (5 / 3)
  np.testing.assert_allclose(a[i], [16 - s / r / 2, 8 - s * r / 2, 16 + s / r / 2, 8 + s * r / 2],
                             rtol=1e-5)
  hw = (a[:, 3] - a[:, 1]) / (a[:, 2] - a[:, 0])
  np.testing.assert_allclose(hw, 1.3, rtol=1e-5)   # height / width everywhere
  # last anchor: level 5 (stride 128), cell (4, 4) -> centre (512, 512), largest scale
  s = 128 * 2 ** 2
  np.testing.assert_allclose(a[-1], [512 - s / r / 2, 512 - s * r / 2, 512 + s / r / 2,
                                     512 + s * r / 2], rtol=1e-5)


@pytest.mark.parametrize("size", [(100, 100), (72, 130)])
def test_anchor_count_matches_outputs_for_odd_sizes(size):
  model = tinaface_cbam(width=8, fpn_channels=16, stage_sizes=(1, 1, 1, 1))
  (out, _), _ = shapes(model, *size)
  assert out["cls"].shape[1] == model.anchors_for(size).shape[0]


def test_shared_neck_and_head_have_one_batchnorm_per_level():
  """Convs shared by the 6 levels, BN per level: each level's running statistics are its own
  (vedadet's single shared BN, bn_per_level=False, mixes them)."""
  kw = dict(width=8, fpn_channels=16, stage_sizes=(1, 1, 1, 1), stacked_convs=1)
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  per = tinaface_cbam(**kw)
  v = jax.jit(lambda k: per.init(k, x))(jax.random.key(1))
  tower = v["params"]["head"]["cls_conv0"]
  assert sorted(tower) == ["bn0", "bn1", "bn2", "bn3", "bn4", "bn5", "conv"]
  assert sorted(v["params"]["inception"]["b3"]) == ["bn0", "bn1", "bn2", "bn3", "bn4", "bn5",
                                                    "conv"]
  _, new = per.apply(v, x, train=True, mutable=["batch_stats"])
  means = [np.asarray(new["batch_stats"]["head"]["cls_conv0"][f"bn{i}"]["mean"]) for i in range(6)]
  # every level's BN saw a different input: six different running means
  assert all(not np.allclose(means[i], means[j]) for i in range(6) for j in range(i + 1, 6))
  shared = tinaface_cbam(bn_per_level=False, **kw)
  vs = jax.jit(lambda k: shared.init(k, x))(jax.random.key(1))
  assert sorted(vs["params"]["head"]["cls_conv0"]) == ["bn", "conv"]
  # same convs: with the shared model's BN copied to every level, the two agree in train mode
  cp = jax.tree.map(lambda a: a, vs)
  def spread(tree):
    if isinstance(tree, dict) and "bn" in tree and "conv" in tree:
      return {"conv": tree["conv"], **{f"bn{i}": tree["bn"] for i in range(6)}}
    return {k: spread(t) for k, t in tree.items()} if isinstance(tree, dict) else tree
  vp = {"params": {k: (spread(t) if k in ("head", "inception") else t)
                   for k, t in cp["params"].items()},
        "batch_stats": {k: (spread(t) if k in ("head", "inception") else t)
                        for k, t in cp["batch_stats"].items()}}
  (o1, _), _ = per.apply(vp, x, train=True, mutable=["batch_stats"])
  (o2, _), _ = shared.apply(vs, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(o1["cls"], o2["cls"], rtol=1e-5, atol=1e-5)


def test_gn_variant_and_bad_norm():
  model = tinaface_cbam(width=8, fpn_channels=128, stage_sizes=(1, 1, 1, 1), norm="gn")
  (out, _), v = shapes(model, 64)
  assert out["box"].shape == (1, 3 * (256 + 64 + 16 + 4 + 1 + 1), 4)
  assert "gn" in v["params"]["head"]["cls_conv0"]
  with pytest.raises(ValueError, match="norm='ln'"):
    shapes(tinaface_cbam(width=8, fpn_channels=16, stage_sizes=(1, 1, 1, 1), norm="ln"), 64)
  with pytest.raises(ValueError, match="depth=34"):
    tinaface_cbam(34)


def test_small_model_two_train_steps_and_postprocess():
  # One tower conv per branch: XLA's CPU compile time grows with every conv, and the
  # shared neck and head are traced once per level (6 x).
  model = tinaface_cbam(width=8, fpn_channels=16, stage_sizes=(1, 1, 1, 1), stacked_convs=1)
  size = 64
  anchors = jnp.asarray(model.anchors_for(size))
  x = jax.random.uniform(jax.random.key(1), (2, size, size, 3), minval=-1, maxval=1)
  gt = jnp.array([[[10., 10., 30., 34.], [0., 0., 0., 0.]],
                  [[30., 20., 50., 46.], [5., 5., 20., 24.]]])
  valid = jnp.array([[True, False], [True, True]])
  variables = jax.jit(lambda k: model.init(k, x))(jax.random.key(0, impl="rbg"))
  # vedadet init: cls bias = -log(99) so every anchor starts at probability 0.01.
  np.testing.assert_allclose(variables["params"]["head"]["cls"]["bias"], -math.log(99), rtol=1e-6)
  tx = optax.sgd(0.01, momentum=0.9)

  @jax.jit
  def step(params, stats, opt):
    def loss_fn(p):
      (out, feats), new = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                      mutable=["batch_stats"])
      loss, metrics = detection_loss(out, anchors, gt, valid)
      return loss, (metrics, new["batch_stats"], feats, out)
    (loss, (metrics, stats, feats, out)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), stats, opt, loss, metrics, feats, out

  params, stats = variables["params"], variables["batch_stats"]
  opt = tx.init(params)
  p1, s1, opt, loss1, m1, feats, _ = step(params, stats, opt)
  p2, s2, opt, loss2, m2, _, out = step(p1, s1, opt)
  assert np.isfinite(loss1) and np.isfinite(loss2)
  assert float(m1["num_pos"]) >= 1.0          # the gt boxes found positive anchors
  assert float(loss2) < float(loss1)          # same batch: one SGD step lowers the loss
  assert len(feats.channel_maps) == 4
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), params, p2)
  assert moved["head"]["cls"]["kernel"] > 0 and moved["backbone"]["stem_conv"]["kernel"] > 0
  assert not np.allclose(s2["backbone"]["stem_bn"]["mean"], stats["backbone"]["stem_bn"]["mean"])
  assert all(np.all(np.isfinite(l)) for l in jax.tree.leaves(p2))

  # post-processing on the (train-mode) outputs of step 2; eval mode is covered in test_resnet
  det = jax.jit(lambda o: postprocess(o, anchors, size, max_det=20, pre_nms_topk=200))(out)
  assert det["boxes"].shape == (2, 20, 4) and det["valid"].dtype == jnp.bool_
  s = np.asarray(det["scores"])
  v = np.asarray(det["valid"])
  assert np.all(s[v] > 0.02) and np.all(s[~v] == 0)
  assert np.all(np.diff(np.where(v, s, -1.0), axis=1) <= 0)   # sorted, padding last
  b = np.asarray(det["boxes"])[v]
  assert np.all(b >= 0) and np.all(b <= size)
