"""What the train loop asks of a task. A task supplies the model, data, loss and evaluator."""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

log = logging.getLogger(__name__)


class Task:
  """Subclasses load their data in `load_data` and may add per-record training transforms
  in `augment_transforms`; the data, its size and the train loader are then common."""
  name = "task"
  input_size: int = 112
  batch_keys: Tuple[str, ...] = ("image", "label")  # what a training batch holds

  def __init__(self, cfg):
    self.cfg = cfg
    self._data = None

  # --- data ------------------------------------------------------------------------------
  def load_data(self) -> Dict[str, Any]:
    """{'train': random-access source, optional 'train_transforms' (decoding the stored
    records), 'train_dir' (the prepared tfds builder folder the training records come from;
    none for data made in memory), 'num_classes', and what the task's evaluation reads}."""
    raise NotImplementedError

  @property
  def data(self) -> Dict[str, Any]:
    if self._data is None:
      self._data = self.load_data()
    return self._data

  def data_record(self) -> Optional[Dict[str, str]]:
    """{'dir', 'identity'} of the prepared training data (`prepared_identity`: a content hash,
    the same for a copy anywhere), or None for data made in memory; what a stage records and
    is checked against (train/loop.py `check_stage_data`). Hashed once per task: it reads
    every byte of the folder (300 MB in 1.1 s on the 2-core test VM: about 10 s for the few GB
    of CASIA-WebFace, once per run)."""
    if not hasattr(self, "_data_record"):
      d = self.data.get("train_dir")
      if d:
        from askd_jax.data.prepared import prepared_identity
        d = os.path.abspath(d)
        self._data_record = {"dir": d, "identity": prepared_identity(d)}
      else:
        self._data_record = None
    return self._data_record

  @property
  def num_classes(self) -> int:
    return int(self.data["num_classes"])

  @property
  def num_train_examples(self) -> int:
    return len(self.data["train"])

  def augment_transforms(self) -> list:
    """Per-record training transforms after decoding (augmentation)."""
    return []

  def train_loader(self, global_batch: int, seed: int):
    """Shuffled, sharded, batched training records: decode, augment, keep `batch_keys`."""
    from askd_jax.data import pipeline
    ops = [*self.data.get("train_transforms", ()), *self.augment_transforms()]
    log.info("training records: %s", " | ".join(map(repr, ops)) or "as stored")
    return pipeline.make_train_loader(self.data["train"], global_batch_size=global_batch,
                                      seed=seed, transforms=ops,
                                      worker_count=self.cfg.data.get("workers", 0),
                                      keys=self.batch_keys)

  # --- model -------------------------------------------------------------------------
  def model(self, dtype=jnp.float32, spec: Dict[str, Any] | None = None,
            platform: str | None = None):
    """The flax model of `spec` (default: this config's). `platform` is where it will run
    (a device's `.platform`; the train loop passes its mesh's, default JAX's default
    backend): `ops.on_cpu(platform)` becomes the model's `cpu_ops` field, so its layers use
    askd_jax.ops' XLA:CPU formulations exactly there. The parameters are the same."""
    raise NotImplementedError

  def spec(self) -> Dict[str, Any]:
    """The model description written beside its checkpoints (model.json)."""
    raise NotImplementedError

  def check_teacher(self, tspec: Dict[str, Any], path: str) -> None:
    mine = self.spec()
    for k in ("task", "arch", "input_size"):
      if tspec.get(k) != mine.get(k):
        raise ValueError(f"teacher {path} has {k}={tspec.get(k)!r} but this run needs "
                         f"{k}={mine.get(k)!r}; point student.teacher at a matching checkpoint")

  def pretrained_variables(self) -> Dict[str, Any] | None:
    """Part of {'params', 'batch_stats'} to start a fresh stage from (e.g. an ImageNet
    backbone), overlaid on the random initialisation; None: start from scratch."""
    return None

  # --- one batch -----------------------------------------------------------------------
  def preprocess(self, batch) -> jax.Array:
    """uint8 NHWC -> float32 in [-1, 1] (the official (x / 255 - 0.5) / 0.5)."""
    return batch["image"].astype(jnp.float32) * (1.0 / 127.5) - 1.0

  def sample_batch(self, n: int) -> Dict[str, np.ndarray]:
    s = self.input_size
    return {"image": np.zeros((n, s, s, 3), np.uint8), "label": np.zeros((n,), np.int32)}

  def forward(self, model, variables, x, batch, *, train: bool, rngs=None):
    """((outputs, Features), new_model_state)."""
    if train:
      return model.apply(variables, x, batch.get("label"), train=True, rngs=rngs,
                         mutable=["batch_stats"])
    return model.apply(variables, x, None, train=False), {}

  def loss(self, outputs, batch) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    logits = outputs["logits"].astype(jnp.float32)
    labels = batch["label"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    acc = (jnp.argmax(logits, -1) == labels).mean()
    return ce, {"accuracy": acc}

  # --- evaluation ------------------------------------------------------------------------
  def evaluate(self, model, variables, stage, sizes) -> Dict[str, Any]:
    raise NotImplementedError

  def eval_data_identity(self) -> str | None:
    """The content identity of the prepared data the evaluation reads
    (`data.prepared.prepared_identity`), part of the eval.json cache key; None where the
    config alone fixes the data (generated sets)."""
    return None
