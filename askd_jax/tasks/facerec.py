"""Face recognition: iResNet-CBAM + margin head, trained on identities, verified on pairs."""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np

from askd_jax import ops
from askd_jax.data import degrade as degrade_lib
from askd_jax.models import MarginModel, iresnet_cbam, make_margin
from askd_jax.tasks.base import Task

log = logging.getLogger(__name__)


class FaceRecTask(Task):
  name = "facerec"

  def __init__(self, cfg):
    super().__init__(cfg)
    self.input_size = cfg.data.image_size
    self._eval_sets = None  # eval_data() without the training set

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

  def model(self, dtype=jnp.float32, spec=None, platform=None):
    s = spec or self.spec()
    backbone = iresnet_cbam(s.get("depth", 50), s.get("width", 1.0), s.get("stage_sizes"),
                            embedding_dim=s.get("embedding_dim", 512),
                            dropout=self.cfg.model.get("dropout", 0.4), dtype=dtype,
                            cpu_ops=ops.on_cpu(platform))
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
    """jitted (variables, uint8 images, key) -> flip-concat embeddings (B, 2D) of the
    official evaluation: `verification.flip_concat_embed`, each view degraded to `sizes`
    AFTER the flip (HR when sizes is empty)."""
    from askd_jax.evaluate.verification import flip_concat_embed
    from askd_jax.train.loop import student_degrade_cfg
    deg = degrade_lib.make_degrade(student_degrade_cfg(degrade_cfg, sizes)) if sizes else None

    @jax.jit
    def embed(variables, images, key):
      def net(x):
        (out, _), _ = self.forward(model, variables, x, {}, train=False)
        return out["embedding"].astype(jnp.float32)
      # one key for both views: with several sizes each image and its flip get the same one
      return flip_concat_embed(net, self.preprocess({"image": images}),
                               None if deg is None else (lambda x: deg(x, key)))

    return embed

  def embed_batches(self, model, variables, images, sizes=(), batch: int = 64, seed: int = 0):
    """(start, float32 (n, 2D) embeddings) for each batch of uint8 (N, S, S, 3) `images` or
    of a streamed set (`eval_stream.StreamedImages`, decoded a batch at a time), in order."""
    from askd_jax.data import eval_stream
    embed = self.embed_fn(model, sizes, self.cfg.student)
    key = jax.random.key(seed)
    for i, chunk, n in eval_stream.batches(images, batch):  # chunk padded: one compiled shape
      yield i, np.asarray(embed(variables, chunk, jax.random.fold_in(key, i)))[:n]

  def embeddings(self, model, variables, images, sizes=(), batch: int = 64,
                 seed: int = 0) -> np.ndarray:
    """(N, 2D) float32 embeddings of `images` (see embed_batches): only the output grows
    with N."""
    out = None
    for i, e in self.embed_batches(model, variables, images, sizes, batch, seed):
      if out is None:
        out = np.empty((len(images),) + e.shape[1:], e.dtype)
      out[i:i + len(e)] = e
    return out

  def eval_data(self) -> Dict[str, Any]:
    """The evaluation sets; without the training set when only evaluating (--evaluate)."""
    if self._data is None and self.cfg.data.name != "orl":
      if self._eval_sets is None:
        self._eval_sets = _load_eval_sets(self.cfg.data)
      return self._eval_sets
    return self.data

  def eval_data_identity(self) -> str:
    """`prepared_identity` of the prepared sets the evaluation reads (ORL's demo build, or
    the verification sets and TinyFace), whatever data_dir holds them."""
    from askd_jax.data.prepared import prepared_identity
    dcfg = self.cfg.data
    if dcfg.name == "orl":
      from askd_jax.data import orl
      return prepared_identity(orl.prepare(dcfg.get("data_dir") or None, dcfg.image_size).data_dir)
    from askd_jax.data import faces, ijb
    data_dir = dcfg.get("data_dir") or os.path.expanduser("~/tensorflow_datasets")
    sources = [(n, "test") for n in _names(dcfg.get("verification", ()))]
    sources += [("tinyface", sp) for sp in ("probe", "gallery")] if dcfg.get("tinyface") else []
    dirs = [faces.data_source(n, sp, data_dir).dataset_info.data_dir for n, sp in sources]
    ijb_names = _names(dcfg.get("ijb", ()))
    dirs += [ijb.data_source(n, data_dir).dataset_info.data_dir for n in ijb_names]
    sources += [(n, "images") for n in ijb_names]
    return prepared_identity(*dict.fromkeys(dirs), splits={sp for _, sp in sources})

  def evaluate(self, model, variables, sizes=()) -> Dict[str, Any]:
    """Per set {'accuracy', 'std'} (10-fold, official) and, for verification sets, the
    'threshold' of `verification.deploy_threshold` and 'tar_far1e-2'; TinyFace rank-k as
    tinyface_rankK; IJB-B/C TAR at each FAR as ijbc_TAR@FAR=1e-06 ... 1e-01. One resolution:
    `sizes` is () (HR) or one LR size."""
    from askd_jax.evaluate import identification, ijb, verification
    if len(sizes) > 1:
      raise ValueError(f"sizes={tuple(sizes)}: evaluate one size at a time "
                       "(experiment.one_size_each)")
    data = self.eval_data()
    batch = self.cfg.eval.get("batch_size", 64)
    results = {}
    for vs in data["verification"]:
      t = time.time()
      emb = self.embeddings(model, variables, vs["images"], sizes, batch=batch)
      e1, e2 = emb[vs["idx1"]], emb[vs["idx2"]]
      r = verification.verification_accuracy(e1, e2, vs["issame"], nfolds=10,
                                             fold_ids=vs.get("fold_ids"))
      results[vs["name"]] = {"accuracy": float(r["mean"]), "std": float(r["std"]),
                             "threshold": verification.deploy_threshold(e1, e2, vs["issame"]),
                             "tar_far1e-2": verification.tar_at_far(e1, e2, vs["issame"], 1e-2),
                             "seconds": time.time() - t}
    if "tinyface" in data:
      tf = data["tinyface"]
      emb = self.tinyface_embeddings(model, variables, batch)
      r = identification.rank_k(emb["probe"], tf["probe"]["label"], emb["gallery"],
                                tf["gallery"]["label"])
      for k, v in r.items():
        results[f"tinyface_{k}"] = {"accuracy": float(v), "std": None}
    for s in data.get("ijb", ()):
      # insightface's 1:1 template protocol (evaluate/ijb.py) on the aligned crops, degraded
      # to `sizes` as the verification images are; the embeddings go into per-media sums
      # batch by batch and are not kept.
      acc = ijb.TemplateFeatures(s["template"], s["media"], **dict(self.cfg.eval.get("ijb", {})))
      for i, e in self.embed_batches(model, variables, s["images"], sizes, batch=batch):
        acc.add(np.arange(i, i + len(e)), e, s["score"][i:i + len(e)])
      for k, v in ijb.evaluate_templates(acc, *s["pairs"]).items():
        results[f"{s['name']}_{k}"] = {"accuracy": v, "std": None}
    return results

  def tinyface_embeddings(self, model, variables, batch: int = 64) -> Dict[str, np.ndarray]:
    """{'probe', 'gallery'}: (N, D) embeddings `evaluate` ranks (rank_k L2-normalises them).
    Native low-resolution images, never degraded whatever the student's size (official
    test_tinyface.py); (f(x) + f(flip x)) / 2."""
    from askd_jax.evaluate import identification
    return {sp: identification.flip_average(self.embeddings(model, variables, d["image"], (),
                                                            batch=batch))
            for sp, d in self.eval_data()["tinyface"].items()}


def load_face_data(dcfg) -> Dict[str, Any]:
  """{'train': data source, 'num_classes', 'verification': [eval sets]} for the config."""
  name = dcfg.name
  if name == "orl":
    from askd_jax.data import orl
    d = orl.load_demo(dcfg.get("data_dir") or None, dcfg.image_size,
                      num_pairs=0 if dcfg.get("all_pairs") else dcfg.get("num_pairs", 600),
                      split=dcfg.get("split", -1), num_splits=dcfg.get("num_splits", 4))
    ver = [{"name": "orl_test", "images": d["test_images"], "idx1": d["pairs"]["idx1"],
            "idx2": d["pairs"]["idx2"], "issame": d["pairs"]["issame"]}]
    return {"train": d["train"], "train_dir": d["builder"].data_dir,
            "num_classes": d["num_classes"], "verification": ver}
  return _load_real_face_data(dcfg)


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
  return {"train": train, "train_dir": b.data_dir, "num_classes": num_classes,
          "train_transforms": faces.decode_transforms(
              size, dcfg.get("on_corrupt", "error"),
              jpeg_roundtrip=dcfg.get("jpeg_roundtrip", False)),
          **_load_eval_sets(dcfg)}


def _load_eval_sets(dcfg) -> Dict[str, Any]:
  """{'verification': [pair sets], optional 'tinyface': {'probe', 'gallery'}, optional
  'ijb': [IJB-B/C sets: template, media, detector score per image, template pairs]}
  (prepared), their images streamed from the prepared files (`eval_stream.StreamedImages`), their pair
  flags, folds and labels read up front."""
  from askd_jax.data import eval_stream, faces
  data_dir = dcfg.get("data_dir") or os.path.expanduser("~/tensorflow_datasets")
  # Decoded at the model's input size. TinyFace: AdaFace's aligned TinyFace is already
  # 112x112, so at the paper's size this is no resize (and never a student degradation).
  decode = faces.decode_transforms(dcfg.image_size, "error")
  # The official export re-encodes the .bin images as JPEG (data.jpeg_roundtrip); TinyFace and
  # IJB are read from their own files, never round-tripped.
  ver_decode = faces.decode_transforms(dcfg.image_size, "error",
                                       jpeg_roundtrip=dcfg.get("jpeg_roundtrip", False))
  ver = []
  for name in _names(dcfg.get("verification", ())):
    source = faces.data_source(name, "test", data_dir)
    d = eval_stream.columns(source, ("is_same", "fold"))
    n = len(d["is_same"])
    images = eval_stream.StreamedImages(eval_stream.PairImages(source, name), ver_decode)
    ver.append({"name": name, "images": images, "idx1": np.arange(0, 2 * n, 2),
                "idx2": np.arange(1, 2 * n, 2), "issame": d["is_same"].astype(bool),
                "fold_ids": d["fold"]})
  out = {"verification": ver}
  if dcfg.get("tinyface"):
    out["tinyface"] = {}
    for sp in ("probe", "gallery"):
      source = faces.data_source("tinyface", sp, data_dir)
      out["tinyface"][sp] = {"image": eval_stream.StreamedImages(source, decode),
                             **eval_stream.columns(source, ("label",))}
  for name in _names(dcfg.get("ijb", ())):
    from askd_jax.data import ijb
    out.setdefault("ijb", []).append({
        "name": name, "images": eval_stream.StreamedImages(ijb.data_source(name, data_dir),
                                                           decode),
        **ijb.image_meta(name, data_dir), "pairs": ijb.template_pairs(name, data_dir)})
  return out


def _names(value) -> list:
  """Set names of a config field: ('lfw', 'agedb_30') or 'lfw,agedb_30' (the command line)."""
  value = (value,) if isinstance(value, str) else value
  return [n.strip() for v in value for n in str(v).split(",") if n.strip()]
