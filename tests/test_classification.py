"""Classification task: ImageNet builder on fake tars in the real layout, transforms, top-k,
2 train steps + evaluation of a teacher and an A-SKD student through the real pipeline,
and the small preset end to end from the CLI."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from askd_jax.data import fixtures, imagenet, shapes

from conftest import cli_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SYNSETS = (0, 7, 999)           # class indices in tfds's labels.txt
VAL_NAMES = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in (3, 1, 4, 2)]  # tar order != sorted order


# ------------------------------------------------------------------------ fixture files

def write_fake_imagenet(root) -> dict:
  return fixtures.write_fake_imagenet(root, TRAIN_SYNSETS, 3, [int(n[-13:-5]) for n in VAL_NAMES])


@pytest.fixture(scope="module")
def fake_imagenet(tmp_path_factory):
  root = tmp_path_factory.mktemp("imagenet")
  manual = root / "manual"
  manual.mkdir()
  files = write_fake_imagenet(str(manual))
  builder = imagenet.prepare(str(manual), str(root / "data"))
  return {"manual": str(manual), "data": str(root / "data"), "files": files,
          "builder": builder}


# ------------------------------------------------------------------------ builder

def test_imagenet_builder_reads_the_real_tar_layout(fake_imagenet):
  b, files = fake_imagenet["builder"], fake_imagenet["files"]
  assert {k: v.num_examples for k, v in b.info.splits.items()} == {"train": 9, "validation": 4}
  for split, tfds_split in (("train", "train"), ("val", "validation")):
    src = b.as_data_source(tfds_split)
    got = {}
    for i in range(len(src)):
      r = src[i]
      name = r["file_name"].decode() if isinstance(r["file_name"], bytes) else str(r["file_name"])
      got[name] = (bytes(r["image"]), int(r["label"]))
    assert got == files[split]  # original bytes, label by synset / by sorted validation name


def test_imagenet_prepare_without_files_names_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="ILSVRC2012_img_train.tar") as e:
    imagenet.prepare(str(tmp_path), str(tmp_path / "data"))
  assert "\n" not in str(e.value)


# ------------------------------------------------------------------------ transforms

def test_inception_crop_boxes_stay_in_range():
  rng = np.random.default_rng(0)
  for h, w in ((300, 400), (50, 50), (480, 200)):
    for _ in range(200):
      t, l, ch, cw = imagenet.random_resized_crop_box(h, w, rng)
      assert 0 <= t and t + ch <= h and 0 <= l and l + cw <= w
      assert 0.08 * h * w * 0.85 <= ch * cw <= h * w
      assert 3 / 4 * 0.9 <= cw / ch <= 4 / 3 * 1.1
  # An image too elongated for any sample: the centred crop with the ratio clamped to 4/3.
  assert imagenet.random_resized_crop_box(10, 1000, rng, scale=(0.99, 1.0)) == (0, 493, 10, 13)


def test_eval_resize_center_crop_box():
  # 300x400 (h x w): shorter side -> 256, width int(256 * 400 / 300) = 341; centre 224.
  assert imagenet.resize_center_crop_box(300, 400, 256, 224) == ((341, 256), (58, 16, 282, 240))
  rec = {"image": np.full((300, 400, 3), 7, np.uint8), "label": 1}
  out = imagenet.DecodeResizeCenterCrop(224, 256).map(rec)["image"]
  assert out.shape == (224, 224, 3) and out.dtype == np.uint8 and (out == 7).all()
  crop = imagenet.DecodeRandomResizedCrop(24).random_map(
      {"image": fixtures.encode_image(np.zeros((30, 50, 3), np.uint8), "JPEG", "CMYK"), "label": 0},
      np.random.default_rng(1))["image"]
  assert crop.shape == (24, 24, 3) and crop.dtype == np.uint8


# ------------------------------------------------------------------------ top-k

def test_topk_on_hand_made_logits():
  from askd_jax.tasks.classification import topk_accuracy, topk_correct
  logits = np.array([
      [0.1, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0],   # label 1: rank 0
      [0.5, 0.4, 0.3, 0.2, 0.1, 0.0, -1.0],  # label 4: rank 4 (top-5, not top-1)
      [0.5, 0.4, 0.3, 0.2, 0.1, 0.0, -1.0],  # label 5: rank 5 (neither)
      [3.0, 2.0, 1.0, 0.0, 4.0, 5.0, 6.0],   # label 2: rank 5 (6, 5, 4, 3, 2 above it)
  ], np.float32)
  labels = np.array([1, 4, 5, 2])
  assert topk_accuracy(logits, labels, (1, 2, 5)) == {1: 0.25, 2: 0.25, 5: 0.5}
  # Padding rows (mask False or label -1) count as neither seen nor correct.
  c = topk_correct(logits, np.array([1, 4, -1, 2]), (1, 5), mask=np.array([1, 0, 1, 1], bool))
  np.testing.assert_array_equal(np.asarray(c), [1.0, 1.0])  # only row 0 counts, correct


# ------------------------------------------------------------------------ shapes

def test_shapes_are_deterministic_and_balanced(tmp_path):
  a, la = shapes.render(13, "train", 32)
  b, lb = shapes.render(13, "train", 32)
  assert la == lb == 3 and np.array_equal(a, b) and a.shape == (32, 32, 3)
  assert not np.array_equal(a, shapes.render(13, "test", 32)[0])
  builder = shapes.prepare(str(tmp_path), 32, num_train=20, num_test=10)
  src = builder.as_data_source("test")
  assert len(src) == 10 and len(builder.as_data_source("train")) == 20
  assert sorted(int(src[i]["label"]) for i in range(10)) == list(range(10))
  dec = imagenet.DecodeResizeCenterCrop(32, 32).map(dict(src[4]))["image"]
  np.testing.assert_array_equal(dec, shapes.render(4, "test", 32)[0])  # PNG is lossless


# ------------------------------------------------------------------------ config

def _config_module():
  """configs/imagenet.py, loaded by path (configs/ is not a package)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("askd_configs_imagenet",
                                                os.path.join(REPO, "configs", "imagenet.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_factors_drive_student_sizes():
  cfg_mod = _config_module()
  c = cfg_mod.get_config("imagenet")
  assert c.student.sizes == (112, 56, 28) and c.train.lr == 0.4 and c.train.batch_size == 1024
  c.student.factors = (4,)
  assert c.student.sizes == (56,)
  c.data.image_size = 128
  assert c.student.sizes == (32,)
  assert cfg_mod.get_config("imagenet_x8").student.sizes == (28,)
  c.student.factors = (3,)
  with pytest.raises(ValueError, match="factors"):
    _ = c.student.sizes


# ------------------------------------------------------------------------ train + eval

def _tiny_cfg(fake, workdir_root):
  c = _config_module().get_config("imagenet")
  c.dtype = "float32"
  c.jax_cache_dir = ""
  c.data.manual_dir, c.data.data_dir = fake["manual"], fake["data"]
  c.data.image_size, c.data.eval_resize, c.data.workers = 32, 36, 0
  c.model.depth, c.model.width, c.model.stage_sizes = 18, 8, (1, 1, 1, 1)
  c.train.batch_size, c.train.steps, c.train.log_every = 4, 2, 1
  c.train.warmup_epochs = 0.0
  c.student.factors, c.student.methods = (4,), ("askd",)
  c.eval.batch_size = 2
  return c


def test_teacher_and_askd_student_train_and_evaluate(fake_imagenet, tmp_path):
  from askd_jax import experiment
  from askd_jax.tasks import get_task
  from askd_jax.tasks.classification import topk_accuracy
  from askd_jax.train import checkpoint as ckpt_lib
  from askd_jax.train import loop

  cfg = _tiny_cfg(fake_imagenet, tmp_path)
  task = get_task(cfg)
  assert task.num_classes == 1000 and task.num_train_examples == 9
  workdir = str(tmp_path / "run")
  stages = experiment.plan_stages(cfg, workdir)
  assert [(s.name, s.kind, tuple(s.sizes)) for s in stages] == [
      ("teacher", "teacher", ()), ("student_askd_8px", "student", (8,))]

  logged = {}

  class Writer:  # collects what the loop logs each step
    def add_scalar(self, tag, value, step):
      logged[(tag, step)] = float(value)

    def flush(self):
      pass

    def close(self):
      pass

  tdir = loop.train_stage(cfg, task, stages[0], workdir, progress=False,
                          writer_factory=lambda name: Writer())
  sdir = loop.train_stage(cfg, task, stages[1], workdir, progress=False,
                          writer_factory=lambda name: Writer())
  for stage in ("teacher", "student_askd_8px"):
    assert all(math.isfinite(logged[(f"{stage}/loss", s)]) for s in (1, 2))
  # The student's loss is cross-entropy + a positive A-SKD term.
  d = logged[("student_askd_8px/distill_loss", 1)]
  assert d > 0 and logged[("student_askd_8px/loss", 1)] == pytest.approx(
      logged[("student_askd_8px/task_loss", 1)] + d, rel=1e-5)
  assert ("teacher/distill_loss", 1) not in logged
  tvars, tspec = ckpt_lib.load_model(tdir)
  svars, sspec = ckpt_lib.load_model(sdir)
  assert tspec["trained_steps"] == sspec["trained_steps"] == 2
  assert sspec["method"] == "askd" and sspec["sizes"] == [8] and tspec["num_classes"] == 1000
  assert sspec["teacher"]["params_hash"] == ckpt_lib.params_hash(tvars["params"])
  # 2 SGD steps moved the student away from the initialisation the loop gave it.
  key = jax.random.fold_in(jax.random.key(cfg.seed), loop._stage_salt("student_askd_8px"))
  k_param, k_drop, _ = jax.random.split(key, 3)
  sample = task.sample_batch(2)
  init = jax.jit(lambda: task.model().init({"params": k_param, "dropout": k_drop},
                                           task.preprocess(sample), None, train=True))()
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), svars["params"],
                       init["params"])
  assert max(jax.tree.leaves(moved)) > 0

  res_t = experiment.evaluate_stage(task, cfg, tdir, [(), (8,)])
  res_s = experiment.evaluate_stage(task, cfg, sdir, [(8,)])
  assert set(res_t) == {"HR", "8"} and set(res_s) == {"8"}
  for r in (res_t["HR"], res_t["8"], res_s["8"]):
    assert set(r) == {"validation top-1", "validation top-5"}
    assert r["validation top-1"]["count"] == 4
    assert r["validation top-1"]["accuracy"] <= r["validation top-5"]["accuracy"]

  # The evaluator equals top-k on logits computed here, record by record, without grain.
  model = task.model(spec=tspec)
  src = task.data["eval"]["validation"]
  crop = imagenet.DecodeResizeCenterCrop(32, 36)
  imgs = np.stack([crop.map(dict(src[i]))["image"] for i in range(len(src))])
  labels = np.array([int(src[i]["label"]) for i in range(len(src))])
  (out, _) = model.apply(tvars, task.preprocess({"image": jnp.asarray(imgs)}), train=False)
  want = topk_accuracy(np.asarray(out["logits"]), labels, (1, 5))
  assert res_t["HR"]["validation top-1"]["accuracy"] == pytest.approx(want[1])
  assert res_t["HR"]["validation top-5"]["accuracy"] == pytest.approx(want[5])


def test_small_preset_runs_from_the_cli(tmp_path):
  workdir = tmp_path / "small"
  args = [sys.executable, "-m", "askd_jax.main", "--config=configs/imagenet.py:small",
          f"--workdir={workdir}", "--config.train.steps=3", "--config.train.batch_size=8",
          "--config.data.num_train=40", "--config.data.num_test=20",
          f"--config.data.data_dir={tmp_path / 'data'}", "--config.eval.batch_size=10",
          "--config.student.methods=askd", "--config.jax_cache_dir="]
  env = cli_env(JAX_PLATFORMS="cpu")
  p = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]
  res = json.loads((workdir / "results.json").read_text())
  got = {(r["method"], r["eval_resolution"], r["set"]) for r in res["rows"]}
  want = {(m, e, f"test top-{k}") for m, e in (("teacher", "HR"), ("teacher", "8"), ("askd", "8"))
          for k in (1, 5)}
  assert got == want
  for r in res["rows"]:
    assert r["count"] == 20 and 0.0 <= r["accuracy"] <= 1.0
  md = (workdir / "results.md").read_text()
  assert "Accuracy (%): `test top-5`" in md and "| Student, A-SKD |" in md
  # --evaluate on any stage directory prints its top-1 / top-5 (here from the eval cache).
  p = subprocess.run(args[:4] + [f"--evaluate={workdir / 'student_askd_8px'}", "--eval_sizes=8"]
                     + args[5:], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  printed = json.loads(p.stdout[p.stdout.index("{"):])
  row = [r for r in res["rows"] if r["method"] == "askd" and r["set"] == "test top-1"][0]
  assert printed["8"]["test top-1"]["accuracy"] == row["accuracy"]
