"""Tasks: the glue between a config, a model, its data, its loss and its evaluator."""
from __future__ import annotations


def get_task(cfg):
  name = cfg.get("task", "facerec")
  if name == "facerec":
    from askd_jax.tasks.facerec import FaceRecTask
    return FaceRecTask(cfg)
  if name == "classification":
    from askd_jax.tasks.classification import ClassificationTask
    return ClassificationTask(cfg)
  if name == "detection":
    from askd_jax.tasks.detection import DetectionTask
    return DetectionTask(cfg)
  raise ValueError(f"config.task={name!r} is unknown; use facerec, classification or detection")
