"""Face recognition: iResNet-CBAM + margin head, trained on identities, verified on pairs."""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict

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

  # --- data ------------------------------------------------------------------------------
  def load_data(self) -> Dict[str, Any]:
    return load_face_data(self.cfg.data)

  def augment_transforms(self) -> list:
    from askd_jax.data import augment
    return augment.face_train_transforms(self.cfg.data.get("augment", "flip"))

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
      t = time.time()
      emb = self.embeddings(model, variables, vs["images"], sizes,
                            batch=self.cfg.eval.get("batch_size", 64))
      r = verification_accuracy(emb[vs["idx1"]], emb[vs["idx2"]], vs["issame"],
                                nfolds=10, fold_ids=vs.get("fold_ids"))
      results[vs["name"]] = {"accuracy": float(r["mean"]), "std": float(r["std"]),
                             "seconds": time.time() - t}
    if "tinyface" in self.data:  # rank-k identification, flip-averaged L2-normalised embeddings
      from askd_jax.evaluate.identification import rank_k
      emb = {}
      for sp, d in self.data["tinyface"].items():
        e = self.embeddings(model, variables, d["image"], sizes,
                            batch=self.cfg.eval.get("batch_size", 64))
        half = e.shape[-1] // 2
        emb[sp] = (e[:, :half] + e[:, half:]) / 2
      r = rank_k(emb["probe"], self.data["tinyface"]["probe"]["label"], emb["gallery"],
                 self.data["tinyface"]["gallery"]["label"])
      for k, v in r.items():
        results[f"tinyface_{k}"] = {"accuracy": float(v), "std": None}
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
  return _load_real_face_data(dcfg)


def _decode_all(source, keys, size):
  from askd_jax.data.faces import decode_image
  out = {k: [] for k in keys}
  rest = {}
  for i in range(len(source)):
    r = source[i]
    for k in keys:
      out[k].append(decode_image(r[k], size, f"record {i} [{k}]"))
    for k, v in r.items():
      if k not in keys:
        rest.setdefault(k, []).append(v)
  return {**{k: np.stack(v) for k, v in out.items()}, **{k: np.asarray(v) for k, v in rest.items()}}


def _load_real_face_data(dcfg) -> Dict[str, Any]:
  """Prepared tfds builders (askd_jax.data.faces) named by data.dataset / verification."""
  from askd_jax.data import faces
  if not dcfg.get("dataset"):
    raise ValueError("config.data.dataset is empty; set it to a prepared training set such as "
                     "casia (see docs/datasets.md)")
  data_dir = dcfg.get("data_dir") or os.path.expanduser("~/tensorflow_datasets")
  size = dcfg.image_size
  train = faces.data_source(dcfg.dataset, "train", data_dir)
  b = faces.builder(dcfg.dataset, data_dir)
  num_classes = int(b.info.metadata.get("num_classes", 0)) if b.info.metadata else 0
  if not num_classes:
    raise ValueError(f"{b.data_dir}: the prepared set records no num_classes; prepare it again "
                     "with python -m askd_jax.data.prepare")
  ver = []
  names = dcfg.get("verification", ())
  if isinstance(names, str):  # --config.data.verification=lfw,agedb_30
    names = [n.strip() for n in names.split(",") if n.strip()]
  for name in names:
    d = _decode_all(faces.data_source(name, "test", data_dir), ("image1", "image2"), size)
    n = len(d["is_same"])
    images = np.empty((2 * n,) + d["image1"].shape[1:], np.uint8)
    images[0::2], images[1::2] = d["image1"], d["image2"]
    ver.append({"name": name, "images": images, "idx1": np.arange(0, 2 * n, 2),
                "idx2": np.arange(1, 2 * n, 2), "issame": d["is_same"].astype(bool),
                "fold_ids": d["fold"]})
  out = {"train": train, "num_classes": num_classes, "verification": ver,
         "train_transforms": faces.decode_transforms(size, dcfg.get("on_corrupt", "error"))}
  if dcfg.get("tinyface"):
    out["tinyface"] = {sp: _decode_all(faces.data_source("tinyface", sp, data_dir), ("image",),
                                       size) for sp in ("probe", "gallery")}
  return out
