"""askd_jax.evaluate.attention: similarities, heat maps, ROC, image loading, and the maps of a
tiny untrained model (no training run needed; the end-to-end run is in test_notebooks.py)."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from askd_jax.evaluate import attention as att


# --- cosine similarity -----------------------------------------------------------------------

def test_cosine_identical_opposite_scaled_orthogonal():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(5, 7, 7)).astype(np.float32)
  np.testing.assert_allclose(att.cosine(a, a), 1.0, atol=1e-6)
  np.testing.assert_allclose(att.cosine(a, -a), -1.0, atol=1e-6)
  np.testing.assert_allclose(att.cosine(a, 3.5 * a), 1.0, atol=1e-6)  # scale-free
  e1 = np.zeros((1, 4)); e1[0, 0] = 1
  e2 = np.zeros((1, 4)); e2[0, 1] = 2
  np.testing.assert_allclose(att.cosine(e1, e2), 0.0, atol=1e-12)
  np.testing.assert_allclose(att.cosine(e1, e1 + e2 / 2), 1 / np.sqrt(2), atol=1e-12)


def test_cosine_zero_map_is_zero_not_nan():
  """torch F.cosine_similarity semantics (norms clamped at eps): a flat-zero map scores 0."""
  a = np.zeros((2, 3, 3))
  b = np.ones((2, 3, 3))
  np.testing.assert_array_equal(att.cosine(a, b), [0.0, 0.0])


def test_cosine_shape_mismatch_is_a_clear_error():
  with pytest.raises(ValueError, match="cannot be compared"):
    att.cosine(np.ones((2, 4, 4)), np.ones((2, 2, 2)))


def test_block_similarity_matches_the_askd_loss():
  """sum over blocks of (1 - block_similarity) is the A-SKD distance (weight 1)."""
  from askd_jax.distill.askd import askd_loss
  from askd_jax.models import Features
  rng = np.random.default_rng(1)
  shapes_c, shapes_s = [(4, 8), (4, 16)], [(4, 6, 6), (4, 3, 3)]
  mk = lambda: Features(embedding=jnp.zeros((4, 2)), stages=(),
                        channel_maps=tuple(jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes_c),
                        spatial_maps=tuple(jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes_s))
  s, t = mk(), mk()
  loss, _ = askd_loss(s, t, jnp.zeros(4, jnp.int32), {"weight": 1.0})
  ch = att.block_similarity(s.channel_maps, t.channel_maps)
  sp = att.block_similarity(s.spatial_maps, t.spatial_maps)
  assert ch.shape == (2,) and sp.shape == (2,)
  np.testing.assert_allclose(float(loss), np.sum(1 - ch) + np.sum(1 - sp), rtol=1e-5)
  # the mean over samples, block by block
  np.testing.assert_allclose(ch[1], np.mean(att.cosine(s.channel_maps[1], t.channel_maps[1])))
  with pytest.raises(ValueError, match="attention blocks"):
    att.block_similarity(s.channel_maps, t.channel_maps[:1])


def test_compare_counts_blocks_per_size():
  sims = {"num_blocks": 3, "students": {
      "student_none_7px": {"method": "none", "sizes": [7], "channel": [0.1, 0.5, 0.3],
                           "spatial": [0.9, 0.9, 0.9]},
      "student_askd_7px": {"method": "askd", "sizes": [7], "channel": [0.2, 0.4, 0.8],
                           "spatial": [0.1, 0.2, 0.3]},
      "student_askd_14px": {"method": "askd", "sizes": [14], "channel": [1, 1, 1],
                            "spatial": [1, 1, 1]}}}  # no baseline at 14: skipped
  c = att.compare(sims)
  assert list(c) == ["7"]
  assert c["7"]["channel"]["higher_blocks"] == 2 and c["7"]["spatial"]["higher_blocks"] == 0
  np.testing.assert_allclose(c["7"]["channel"]["mean_askd"], 1.4 / 3)


# --- heat maps -------------------------------------------------------------------------------

def test_spatial_heatmaps_sigmoid_upsampled():
  m1 = np.full((2, 4, 4), 0.0, np.float32)
  m2 = np.array([[[-50.0, 50.0]]] * 2, np.float32).repeat(2, axis=1)  # (2, 2, 2): left low, right high
  heat = att.spatial_heatmaps([m1, m2], 16)
  assert heat.shape == (2, 2, 16, 16)
  assert heat.min() >= 0.0 and heat.max() <= 1.0
  np.testing.assert_allclose(heat[:, 0], 0.5, atol=1e-6)  # sigmoid(0), constant after resize
  assert heat[0, 1, :, 0].max() < 0.01 and heat[0, 1, :, -1].min() > 0.99  # orientation kept


# --- ROC -----------------------------------------------------------------------------------

def test_roc_curve_perfect_random_and_ties():
  same = np.array([True, True, False, False])
  fpr, tpr, auc = att.roc_curve(np.array([0.9, 0.8, 0.1, 0.2]), same)
  assert auc == pytest.approx(1.0)
  assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
  assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
  _, _, auc = att.roc_curve(np.array([0.1, 0.2, 0.9, 0.8]), same)
  assert auc == pytest.approx(0.0)
  _, _, auc = att.roc_curve(np.full(4, 0.5), same)  # all tied: the diagonal
  assert auc == pytest.approx(0.5)
  # AUC = P(score_pos > score_neg) (+ half the ties): 3 of 4 pairs ordered right
  _, _, auc = att.roc_curve(np.array([0.9, 0.3, 0.5, 0.1]), same)
  assert auc == pytest.approx(0.75)
  with pytest.raises(ValueError, match="both positive and negative"):
    att.roc_curve(np.ones(3), np.ones(3, bool))


# --- images and workdirs ---------------------------------------------------------------------

def test_pick_spreads_and_checks():
  imgs = np.arange(120)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
  got = att.pick(imgs, 4)[:, 0, 0, 0]
  np.testing.assert_array_equal(got, [0, 40, 79, 119])
  assert len(att.pick(imgs[:2], 5)) == 2
  with pytest.raises(ValueError, match="num_images"):
    att.pick(imgs, 0)


def test_load_image_folder(tmp_path):
  from PIL import Image
  Image.fromarray(np.full((30, 20), 200, np.uint8)).save(tmp_path / "b.pgm")  # gray, non-square
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
  (tmp_path / "notes.txt").write_text("not an image")
  x = att.load_image_folder(str(tmp_path), 12)
  assert x.shape == (2, 12, 12, 3) and x.dtype == np.uint8
  assert x[0].max() == 0 and x[1].min() == 200  # sorted by name, gray -> RGB
  assert att.load_image_folder(str(tmp_path), 12, limit=1).shape[0] == 1
  with pytest.raises(FileNotFoundError, match="no such folder"):
    att.load_image_folder(str(tmp_path / "missing"), 12)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="holds no image"):
    att.load_image_folder(str(tmp_path / "empty"), 12)


def test_load_run_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="not an askd_jax workdir"):
    att.load_run(str(tmp_path))
  (tmp_path / "config.json").write_text("{broken")
  with pytest.raises(ValueError, match="not a config written by askd_jax.main"):
    att.load_config(str(tmp_path))


# --- maps of a tiny model (untrained) --------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
  """A Run over a randomly initialised 28 px, width-0.125, 4-block model (no data needed)."""
  from configs.facerec import get_config
  from askd_jax.tasks.facerec import FaceRecTask
  cfg = get_config("demo")
  cfg.data.image_size = 28
  cfg.model.width = 0.125
  task = FaceRecTask(cfg)
  spec = dict(task.spec(), num_classes=5)
  model = task.model(spec=spec)
  # Random weights of the right shapes (eval_shape only traces; compiling init takes a minute).
  shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((2, 28, 28, 3)), None, train=False),
                          jax.random.key(0))

  def random_vars(seed):
    rng = np.random.default_rng(seed)
    def leaf(path, a):
      name = jax.tree_util.keystr(path)
      if "batch_stats" in name:  # running statistics: var 1, mean 0
        return np.ones(a.shape, a.dtype) if "var" in name else np.zeros(a.shape, a.dtype)
      return (0.3 * rng.standard_normal(a.shape)).astype(a.dtype)
    return jax.tree_util.tree_map_with_path(leaf, shapes)

  teacher_vars, other_vars = random_vars(0), random_vars(1)
  t = att.Stage("teacher", "teacher", (), spec, teacher_vars)
  same = att.Stage("student_askd_7px", "askd", (7,), spec, teacher_vars)  # teacher's weights, LR input
  other = att.Stage("student_none_7px", "none", (7,), spec, other_vars)
  run = att.Run("unused", cfg, task, model, t, [other, same])
  images = np.random.default_rng(0).integers(0, 256, (5, 28, 28, 3), dtype=np.uint8)
  return run, images


def test_attention_maps_shapes_and_inputs(tiny):
  run, images = tiny
  m = att.attention_maps(run, run.teacher, images, batch=4)  # 5 images: a padded second batch
  assert len(m["channel"]) == len(m["spatial"]) == 4  # stage_sizes (1, 1, 1, 1)
  assert [s.shape for s in m["spatial"]] == [(5, 14, 14), (5, 7, 7), (5, 4, 4), (5, 2, 2)]
  assert [c.shape[0] for c in m["channel"]] == [5] * 4
  np.testing.assert_allclose(m["inputs"], images / 127.5 - 1.0, atol=1e-6)  # HR: no degradation
  lr = att.attention_maps(run, run.students[1], images, batch=4)
  assert np.abs(lr["inputs"] - m["inputs"]).max() > 0.1  # the student sees the 7 px image
  # a batch is independent of its neighbours (eval mode): one image alone gives the same maps
  one = att.attention_maps(run, run.teacher, images[3:4], batch=4)
  for a, b in zip(one["spatial"], m["spatial"]):
    np.testing.assert_allclose(a[0], b[3], rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match=r"\(N, 28, 28, 3\)"):
    att.attention_maps(run, run.teacher, images[:, :20])


def test_similarities_of_a_copy_and_of_another_model(tiny):
  run, images = tiny
  sims = att.similarities(run, images, batch=4)
  assert sims["num_blocks"] == 4
  assert [b[:2] for b in sims["block_shapes"]] == [[14, 14], [7, 7], [4, 4], [2, 2]]
  for v in sims["students"].values():
    assert np.all(np.abs(v["channel"]) <= 1 + 1e-9) and np.all(np.abs(v["spatial"]) <= 1 + 1e-9)
  # the teacher's own weights on the teacher's own input would give exactly 1; here they see
  # the LR image, yet stay closer to the teacher than an independently initialised network
  same = sims["students"]["student_askd_7px"]
  other = sims["students"]["student_none_7px"]
  assert np.mean(same["channel"]) > np.mean(other["channel"])
  t_only = att.Run("unused", run.cfg, run.task, run.model, run.teacher,
                   [att.Stage("copy", "askd", (), run.teacher.spec, run.teacher.variables)],
                   _fns=run._fns)  # reuse the compiled HR function
  copy = att.similarities(t_only, images, batch=4)["students"]["copy"]
  # identical maps: cosine 1, except a map that is all zeros (a dead 1-unit ReLU in the channel
  # MLP of this tiny random model): 0 there, as torch's clamped-norm cosine gives
  t = att.attention_maps(run, run.teacher, images, batch=4)
  want = [1.0 if np.abs(c).max() > 0 else 0.0 for c in t["channel"]]
  np.testing.assert_allclose(copy["channel"], want, atol=1e-5)
  np.testing.assert_allclose(copy["spatial"], 1.0, atol=1e-5)
  assert sum(want) >= 2  # the check above is not vacuous
  json.dumps(sims)  # serialisable as written by the CLI


def test_attention_grid_layout(tiny):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  run, images = tiny
  stages = run.grid_stages(7)
  assert [s.method for s in stages] == ["teacher", "none", "askd"]
  maps = [att.attention_maps(run, st, images[:2], batch=4) for st in stages]
  fig = att.attention_grid(stages, maps, 1)
  assert len(fig.axes) == (len(stages) + 1) * (4 + 1)  # rows: image + models; cols: input + blocks
  texts = [t.get_text() for ax in fig.axes for t in ax.texts]
  assert len([t for t in texts if t.startswith("cos ")]) == 2 * 4  # students only
  plt.close(fig)
  fig = att.similarity_plot(att.similarities(run, images[:2], batch=4))
  assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 2
  plt.close(fig)
