"""Image classification (ImageNet, or the generated shapes demo) with ResNet-CBAM.

The teacher trains on high-resolution images; students see the same batch down-sampled by
the configured factors and up-sampled back (on device, in the train step), with a frozen
teacher and one distillation method, all through the shared train loop. Evaluation:
top-1 / top-5 accuracy of any model directory on the evaluation split, at high or low
resolution.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from askd_jax import ops
from askd_jax.data import degrade as degrade_lib
from askd_jax.models.resnet import resnet_cbam
from askd_jax.tasks.base import Task

log = logging.getLogger(__name__)


class Classifier(nn.Module):
  """The train loop's model signature around a ResNet-CBAM.

  __call__(x, labels=None, train) -> ({'logits', 'embedding'}, Features). The network
  shares this module's scope, so the parameters are the plain ResNet tree (stem_conv,
  layer1_0, ..., fc), as a converter from torchvision-layout weights would write them.
  """
  net: nn.Module

  def setup(self):
    nn.share_scope(self, self.net)

  def __call__(self, x: jax.Array, labels: jax.Array | None = None, train: bool = False):
    del labels  # softmax cross-entropy needs no labels inside the model
    logits, feats = self.net(x, train)
    return {"logits": logits, "embedding": feats.embedding}, feats


def topk_correct(logits: jax.Array, labels: jax.Array, ks: Sequence[int] = (1, 5),
                 mask: jax.Array | None = None) -> jax.Array:
  """Number of samples whose label is in the top k, for each k: (len(ks),) float32.

  A sample is top-k correct when fewer than k classes score strictly higher than its label
  (ties count in its favour; torch.topk breaks them by index). Rows with mask False (eval
  padding) or a negative label count as neither correct nor seen.
  """
  logits = jnp.asarray(logits, jnp.float32)                       # (B, K)
  labels = jnp.asarray(labels, jnp.int32)                         # (B,)
  valid = labels >= 0
  if mask is not None:
    valid = valid & jnp.asarray(mask, bool)
  own = jnp.take_along_axis(logits, jnp.maximum(labels, 0)[:, None], axis=1)  # (B, 1)
  rank = jnp.sum(logits > own, axis=1)                            # (B,) classes above the label
  return jnp.stack([jnp.sum((rank < k) & valid) for k in ks]).astype(jnp.float32)


def topk_accuracy(logits, labels, ks: Sequence[int] = (1, 5)) -> Dict[int, float]:
  """{k: fraction of samples whose label is in the top k} (numpy or jax inputs)."""
  n = len(labels)
  if n == 0:
    raise ValueError("topk_accuracy: no samples")
  c = np.asarray(topk_correct(logits, labels, ks))
  return {int(k): float(v) / n for k, v in zip(ks, c)}


class ClassificationTask(Task):
  name = "classification"
  report_caption = "Accuracy (%): `{set}`"

  def __init__(self, cfg):
    super().__init__(cfg)
    self.input_size = int(cfg.data.image_size)

  # --- data ------------------------------------------------------------------------------
  def load_data(self) -> Dict[str, Any]:
    return load_classification_data(self.cfg.data)

  def augment_transforms(self) -> list:
    from askd_jax.data import imagenet
    d = self.cfg.data
    return imagenet.train_transforms(self.input_size, d.crop_scale, d.crop_ratio,
                                     d.get("flip", True))

  # --- model -----------------------------------------------------------------------------
  def spec(self) -> Dict[str, Any]:
    m = self.cfg.model
    return {"task": "classification", "arch": "resnet_cbam", "depth": int(m.depth),
            "width": int(m.width), "stage_sizes": list(m.stage_sizes) if m.stage_sizes else None,
            "num_classes": self.num_classes, "input_size": self.input_size,
            "dataset": self.cfg.data.name, "channel_order": "rgb", "input_range": "[-1, 1]"}

  def model(self, dtype=jnp.float32, spec=None, platform=None):
    s = spec or self.spec()
    net = resnet_cbam(s.get("depth", 50), s.get("num_classes", 1000), s.get("width", 64),
                      s.get("stage_sizes") or None, dtype=dtype, cpu_ops=ops.on_cpu(platform))
    return Classifier(net)

  def check_teacher(self, tspec, path):
    super().check_teacher(tspec, path)
    mine = self.spec()
    for k, field in (("depth", "model.depth"), ("width", "model.width"),
                     ("stage_sizes", "model.stage_sizes")):
      if tspec.get(k) != mine[k]:  # attention maps are compared block by block
        raise ValueError(f"teacher {path} has {k}={tspec.get(k)!r} but this run's config.{field} "
                         f"gives {mine[k]!r}; set it to match or use a matching teacher")
    if tspec.get("num_classes") != self.num_classes:
      raise ValueError(f"teacher {path} has num_classes={tspec.get('num_classes')} but the "
                       f"data set has {self.num_classes}; point student.teacher at a teacher "
                       "trained on this data set")

  # --- evaluation ------------------------------------------------------------------------
  def eval_fn(self, model, sizes: Tuple[int, ...] = ()):
    """jitted (variables, batch, key) -> (correct top-k counts..., seen), global over processes."""
    from askd_jax.train.loop import student_degrade_cfg
    deg = (degrade_lib.make_degrade(student_degrade_cfg(self.cfg.student, sizes))
           if sizes else None)
    ks = tuple(int(k) for k in self.cfg.eval.get("topk", (1, 5)))

    @jax.jit
    def counts(variables, batch, key):
      x = self.preprocess(batch)
      if deg is not None:
        x = deg(x, key)
      (out, _), _ = self.forward(model, variables, x, batch, train=False)
      mask = batch["mask"] & (batch["label"] >= 0)
      return jnp.concatenate([topk_correct(out["logits"], batch["label"], ks, mask),
                              jnp.sum(mask, dtype=jnp.float32)[None]])

    return counts, ks

  def eval_data_identity(self) -> str:
    """`prepared_identity` of the evaluation splits' records."""
    from askd_jax.data.prepared import prepared_identity
    ev = self.data["eval"]
    return prepared_identity(*dict.fromkeys(s.dataset_info.data_dir for s in ev.values()),
                             splits=list(ev))

  def evaluate(self, model, variables, sizes=()) -> Dict[str, Any]:
    """{'<split> top-<k>': {'accuracy', 'std': None, 'count'}} for every eval split and k."""
    from askd_jax.data import imagenet, pipeline
    from askd_jax.train import sharding as shd
    d = self.cfg.data
    counts, ks = self.eval_fn(model, tuple(sizes))
    bshard = shd.batch_sharding(shd.make_mesh())
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    key = jax.random.key(self.cfg.get("seed", 0))
    results = {}
    for split, source in self.data["eval"].items():
      loader = pipeline.make_eval_loader(
          source, global_batch_size=int(self.cfg.eval.batch_size),
          transforms=imagenet.eval_transforms(self.input_size, int(d.eval_resize)),
          worker_count=d.get("workers", 0), keys=("image", "label", "mask"))
      total = np.zeros(len(ks) + 1)
      for i, batch in enumerate(loader):
        total += np.asarray(jax.device_get(
            counts(variables, shd.global_batch(batch, bshard), jax.random.fold_in(key, i))))
      seen = int(total[-1])
      if seen != len(source):
        raise RuntimeError(f"evaluation of {split} saw {seen} of {len(source)} records")
      for k, c in zip(ks, total[:-1]):
        results[f"{split} top-{k}"] = {"accuracy": float(c) / seen, "std": None, "count": seen}
    return results


def load_classification_data(dcfg) -> Dict[str, Any]:
  """{'train': source, 'eval': {split: source}, 'num_classes'} for config.data."""
  name = dcfg.name
  if name == "shapes":
    from askd_jax.data import shapes
    b = shapes.prepare(dcfg.get("data_dir") or None, int(dcfg.image_size),
                       int(dcfg.get("num_train") or 5000), int(dcfg.get("num_test") or 1000))
    return {"train": b.as_data_source("train"), "train_dir": b.data_dir,
            "eval": {"test": b.as_data_source("test")}, "num_classes": len(shapes.CLASSES)}
  if name == "imagenet":
    from askd_jax.data import imagenet
    b = imagenet.prepare(dcfg.get("manual_dir") or None, dcfg.get("data_dir") or None,
                         dcfg.get("validation_labels") or None)
    missing = [s for s in ("train", "validation") if s not in b.info.splits]
    if missing:
      raise FileNotFoundError(f"{b.data_dir}: askd_imagenet2012 has no {missing} split; "
                              f"prepare it from a manual_dir holding {imagenet.TRAIN_TAR} and "
                              f"{imagenet.VAL_TAR}")
    return {"train": b.as_data_source("train"), "train_dir": b.data_dir,
            "eval": {"validation": b.as_data_source("validation")},
            "num_classes": len(imagenet.synsets())}
  raise ValueError(f"config.data.name={name!r} is unknown for classification; use imagenet "
                   "or shapes")
