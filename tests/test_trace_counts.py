"""Compile behaviour: the train step and the embedding function trace (and so compile)
once for repeated calls of the same shapes; the step's two forwards carry their names."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from askd_jax.tasks.facerec import FaceRecTask

SPEC = {"task": "facerec", "arch": "iresnet_cbam", "depth": None, "width": 0.125,
        "stage_sizes": [1, 1, 1, 1], "embedding_dim": 8, "num_classes": 5, "margin": "arcface",
        "s": 32.0, "m": 0.5, "input_size": 16, "channel_order": "rgb"}


def _task():
  import configs.facerec as fr
  c = fr.get_config("demo")
  c.model.width, c.data.image_size = 0.125, 16
  return FaceRecTask(c)


def _student_step(task, model):
  """An A-SKD student step (teacher forward, on-device degradation, distillation), jitted
  as the train loop does (`sharding.jit_train_step`), and its Python trace counter."""
  from askd_jax import distill
  from askd_jax.data import degrade
  from askd_jax.train import sharding as shd
  from askd_jax.train.loop import student_degrade_cfg
  from askd_jax.train.optim import sgd_torch
  from askd_jax.train.step import init_state, make_train_step
  cfg = task.cfg
  tx = sgd_torch(0.01, 0.9, 5e-4, False)
  batch = {"image": np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8),
           "label": np.arange(4, dtype=np.int32) % SPEC["num_classes"]}
  v = model.init({"params": jax.random.key(0)}, task.preprocess(jax.tree.map(jnp.asarray, batch)),
                 jnp.asarray(batch["label"]), train=True)
  state = init_state(v["params"], v["batch_stats"], tx, jax.random.key(1))
  t = model.init({"params": jax.random.key(2)}, task.preprocess(jax.tree.map(jnp.asarray, batch)),
                 jnp.asarray(batch["label"]), train=True)
  teacher = {"params": t["params"], "batch_stats": t["batch_stats"]}
  step = make_train_step(task=task, model=model, tx=tx, cpu_ops=model.backbone.cpu_ops,
                         teacher_model=model,
                         distill_fn=distill.get("askd"), distill_cfg=cfg.distill.askd,
                         degrade_fn=degrade.make_degrade(student_degrade_cfg(cfg.student, (8,))))
  traces = []

  def counted(*args):
    traces.append(1)  # runs only while JAX traces the step
    return step(*args)
  # Placed as train_stage places them: state on its shardings, teacher replicated, batch split.
  mesh = shd.make_mesh()
  state_sh = shd.state_shardings(state, mesh)
  jstep = shd.jit_train_step(counted, mesh, state_sh)
  placed = (jax.device_put(state, state_sh), jax.device_put(teacher, shd.replicated(mesh)),
            shd.global_batch(batch, shd.batch_sharding(mesh)))
  return step, jstep, traces, *placed


def test_train_step_traces_once_over_several_steps():
  """Three steps of the same shapes, inputs placed as train_stage places them: one trace.
  Put back by hand, each of these traced twice: `init_state` with `bad_steps=0` (a weak-typed
  counter that the first step returns strongly typed), and (before this test placed them)
  the inputs handed to the jitted step unplaced."""
  task = _task()
  step, jstep, traces, state, teacher, batch = _student_step(task, task.model(spec=SPEC))
  for _ in range(3):
    state, metrics = jstep(state, teacher, batch)
  assert int(state.step) == 3 and set(metrics) >= {"loss", "distill_loss", "grad_norm"}
  assert len(traces) == 1
  # The teacher's and the student's forwards are named scopes of their own (profiles).
  hlo = jax.jit(step).lower(state, teacher, batch).as_text(debug_info=True)
  for name in ("teacher", "student"):  # e.g. "jit(step)/jvp(student)/MarginModel/backbone/..."
    assert re.search(rf"[/(]{name}\)?/MarginModel/", hlo), name


def test_embedding_function_traces_once_with_a_ragged_last_batch(monkeypatch):
  """10 images in batches of 4: the last chunk (2 images) is padded to 4, so one compiled
  shape serves all three calls. (With the padding removed from FaceRecTask.embeddings by
  hand, the cache held 2 entries and this test failed.)"""
  task = _task()
  model = task.model(spec=SPEC)
  x = jnp.zeros((1, 16, 16, 3))
  variables = jax.jit(lambda k: model.init(k, x, None, train=False))(jax.random.key(0))
  made = []
  real = task.embed_fn
  monkeypatch.setattr(task, "embed_fn", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
  images = np.random.default_rng(0).integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
  emb = task.embeddings(model, variables, images, batch=4)
  assert emb.shape == (10, 16) and np.isfinite(emb).all()
  assert len(made) == 1 and made[0]._cache_size() == 1
  # The padded rows do not leak into the real ones: the last two match a batch of their own.
  np.testing.assert_allclose(emb[8:], task.embeddings(model, variables, images[8:], batch=2),
                             rtol=1e-5, atol=1e-6)
