"""Face recognition: iResNet-CBAM + margin head, trained on identities, verified on pairs."""
from __future__ import annotations

import functools
import logging
from typing import Any, Dict, List

import jax
import jax.numpy as jnp
import numpy as np

from askd_jax.data import degrade as degrade_lib
from askd_jax.models import MarginModel, iresnet_cbam, make_margin
from askd_jax.tasks.base import Task

log = logging.getLogger(__name__)


class FaceRecTask(Task):
  name = "facerec"

  def __init__(self, cfg):
    super().__init__(cfg)
    self.input_size = cfg.data.image_size
    self._data = None

  # --- data ------------------------------------------------------------------------------
  @property
  def data(self) -> Dict[str, Any]:
    if self._data is None:
      self._data = load_face_data(self.cfg.data)
    return self._data

  @property
  def num_classes(self) -> int:
    return int(self.data["num_classes"])

  @property
  def num_train_examples(self) -> int:
    return len(self.data["train"])

  def train_loader(self, global_batch: int, seed: int):
    from askd_jax.data import augment, pipeline
    transforms = augment.face_train_transforms(self.cfg.data.get("augment", "flip"))
    return pipeline.make_train_loader(self.data["train"], global_batch_size=global_batch,
                                      seed=seed, transforms=transforms,
                                      worker_count=self.cfg.data.get("workers", 0))

  # --- model -----------------------------------------------------------------------------
  def spec(self) -> Dict[str, Any]:
    m = self.cfg.model
    return {"task": "facerec", "arch": "iresnet_cbam", "depth": m.depth, "width": m.width,
            "stage_sizes": list(m.stage_sizes) if m.stage_sizes else None,
            "embedding_dim": m.embedding_dim, "num_classes": self.num_classes,
            "margin": m.margin, "s": m.s, "m": m.m, "input_size": self.input_size,
            "channel_order": "rgb"}

  def model(self, dtype=jnp.float32, spec=None):
    s = spec or self.spec()
    backbone = iresnet_cbam(s.get("depth", 50), s.get("width", 1.0), s.get("stage_sizes"),
                            embedding_dim=s.get("embedding_dim", 512),
                            dropout=self.cfg.model.get("dropout", 0.4), dtype=dtype)
    head = None
    if s.get("num_classes"):
      head = make_margin(s.get("margin", "arcface"), s["num_classes"], s.get("s", 32.0),
                         s.get("m", 0.5))
    channel_order = str(s.get("channel_order", "rgb")).lower()
    if channel_order not in ("rgb", "bgr"):
      raise ValueError(f"model spec channel_order={channel_order!r}; expected rgb or bgr")
    return MarginModel(backbone, head, bgr=channel_order == "bgr")

  def check_teacher(self, tspec, path):
    super().check_teacher(tspec, path)

  # --- evaluation ------------------------------------------------------------------------
  def embed_fn(self, model, sizes=(), degrade_cfg=None):
    """jitted (variables, uint8 images) -> concat(emb(x), emb(flip(x))), LR-degraded if sizes."""
    from askd_jax.train.loop import student_degrade_cfg
    deg = degrade_lib.make_degrade(student_degrade_cfg(degrade_cfg, sizes)) if sizes else None

    @jax.jit
    def embed(variables, images, key):
      x = self.preprocess({"image": images})
      if deg is not None:
        x = deg(x, key)
      both = jnp.concatenate([x, x[:, :, ::-1]], axis=0)
      (out, _), _ = self.forward(model, variables, both, {}, train=False)
      e = out["embedding"].astype(jnp.float32)
      n = images.shape[0]
      return jnp.concatenate([e[:n], e[n:]], axis=-1)

    return embed

  def embeddings(self, model, variables, images: np.ndarray, sizes=(), batch: int = 64,
                 seed: int = 0) -> np.ndarray:
    embed = self.embed_fn(model, sizes, self.cfg.student)
    out = []
    key = jax.random.key(seed)
    for i in range(0, len(images), batch):
      chunk = images[i:i + batch]
      pad = batch - len(chunk)
      if pad:  # one compiled shape
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
      out.append(np.asarray(embed(variables, chunk, jax.random.fold_in(key, i)))[:batch - pad])
    return np.concatenate(out)

  def evaluate(self, model, variables, sizes=()) -> Dict[str, Any]:
    from askd_jax.evaluate.verification import verification_accuracy
    results = {}
    for vs in self.data["verification"]:
      emb = self.embeddings(model, variables, vs["images"], sizes,
                            batch=self.cfg.eval.get("batch_size", 64))
      r = verification_accuracy(emb[vs["idx1"]], emb[vs["idx2"]], vs["issame"],
                                nfolds=10, fold_ids=vs.get("fold_ids"))
      results[vs["name"]] = {"accuracy": float(r["mean"]), "std": float(r["std"])}
    return results


def load_face_data(dcfg) -> Dict[str, Any]:
  """{'train': data source, 'num_classes', 'verification': [eval sets]} for the config."""
  name = dcfg.name
  if name == "orl":
    from askd_jax.data import orl
    d = orl.load_demo(dcfg.get("data_dir") or None, dcfg.image_size,
                      num_pairs=dcfg.get("num_pairs", 600))
    ver = [{"name": "orl_test", "images": d["test_images"], "idx1": d["pairs"]["idx1"],
            "idx2": d["pairs"]["idx2"], "issame": d["pairs"]["issame"]}]
    return {"train": d["train"], "num_classes": d["num_classes"], "verification": ver}
  from askd_jax.data import faces  # real data sets (tfds builders over the user's files)
  return faces.load_face_data(dcfg)
