"""FaceRecTask glue: model from a spec, channel order, preprocessing, loss."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from askd_jax.models import MarginModel, ArcFace, iresnet_cbam
from askd_jax.tasks.facerec import FaceRecTask


def _cfg():
  import configs.facerec as fr
  c = fr.get_config("demo")
  c.model.width = 0.125
  c.data.image_size = 16
  return c


def test_bgr_spec_reverses_the_input_channels():
  backbone = iresnet_cbam(width=0.125, stage_sizes=(1, 1, 1, 1), embedding_dim=8)
  rgb, bgr = MarginModel(backbone), MarginModel(backbone, bgr=True)
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
  v = rgb.init(jax.random.key(1), x)
  e_bgr, _ = bgr.apply(v, x)
  e_rgb, _ = rgb.apply(v, x[..., ::-1])
  np.testing.assert_allclose(e_bgr["embedding"], e_rgb["embedding"], atol=1e-6)
  assert not np.allclose(e_bgr["embedding"], rgb.apply(v, x)[0]["embedding"], atol=1e-4)


def test_model_from_spec_and_unknown_channel_order():
  task = FaceRecTask(_cfg())
  spec = {"task": "facerec", "arch": "iresnet_cbam", "depth": None, "width": 0.125,
          "stage_sizes": [1, 1, 1, 1], "embedding_dim": 8, "num_classes": 5,
          "margin": "arcface", "s": 32.0, "m": 0.5, "input_size": 16, "channel_order": "bgr"}
  assert task.model(spec=spec).bgr
  with pytest.raises(ValueError, match="channel_order='gbr'"):
    task.model(spec=dict(spec, channel_order="gbr"))


def test_preprocess_is_the_official_normalisation():
  task = FaceRecTask(_cfg())
  img = np.array([[[[0, 127, 255]]]], np.uint8)
  out = np.asarray(task.preprocess({"image": jnp.asarray(img)}))
  np.testing.assert_allclose(out, (img / 255.0 - 0.5) / 0.5, atol=1e-6)


def test_loss_is_cross_entropy_and_accuracy():
  task = FaceRecTask(_cfg())
  logits = jnp.array([[2.0, 0.0], [0.0, 1.0]])
  loss, terms = task.loss({"logits": logits}, {"label": jnp.array([0, 0])})
  want = np.mean([np.log(1 + np.exp(-2.0)), np.log(1 + np.exp(1.0))])
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  assert float(terms["accuracy"]) == 0.5


def test_aggregate_runs_mean_and_t_interval(tmp_path):
  import json
  from askd_jax.report import aggregate_runs
  dirs = []
  for i, acc in enumerate([0.80, 0.90]):
    d = tmp_path / f"run{i}"
    d.mkdir()
    rows = [{"method": "askd", "eval_resolution": "7", "set": "orl_test", "accuracy": acc,
             "std": 0.0}]
    (d / "results.json").write_text(json.dumps({"rows": rows}))
    dirs.append(str(d))
  md = aggregate_runs(dirs)
  # mean +- t(0.975, 1 df) * sd / sqrt(2) = 85 +- 12.706 * 5 (askd_jax/stats.py)
  assert "| Student, A-SKD | 85.00 [21.47, 148.53] (n=2) |" in md
