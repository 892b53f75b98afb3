"""Config validation before any work starts: one line naming the field and the fix."""
from __future__ import annotations

import os


class ConfigError(ValueError):
  pass


def validate(cfg) -> None:
  import jax
  from askd_jax import distill
  task = cfg.get("task", "facerec")
  if task not in ("facerec", "classification", "detection"):
    raise ConfigError(f"config.task={task!r} is unknown; use facerec, classification or detection")
  size = cfg.data.image_size
  st = cfg.get("student")
  if st is not None:
    for m in st.methods:
      if m not in distill.REGISTRY:
        raise ConfigError(f"config.student.methods has {m!r}, an unknown distillation method; "
                          f"choose from {', '.join(sorted(distill.REGISTRY))}")
    for s in st.sizes:
      if not isinstance(s, int) or s <= 0 or s > size:
        raise ConfigError(f"config.student.sizes has {s!r}, but sizes must be integers in "
                          f"[1, data.image_size={size}]; lower it or raise data.image_size")
    if st.teacher and not os.path.isdir(st.teacher):
      raise ConfigError(f"config.student.teacher={st.teacher!r} does not exist; give a trained "
                        "teacher stage directory or a converted checkpoint")
  t = cfg.train
  n = jax.device_count()
  if t.batch_size <= 0 or t.batch_size % n:
    raise ConfigError(f"config.train.batch_size={t.batch_size} must be a positive multiple of "
                      f"the {n} devices; use {max(n, t.batch_size // n * n or n)}")
  if t.lr <= 0:
    raise ConfigError(f"config.train.lr={t.lr} must be > 0")
  if t.get("nan_policy", "stop") not in ("stop", "skip"):
    raise ConfigError(f"config.train.nan_policy={t.nan_policy!r}; use stop or skip")
  if t.epochs <= 0 and not t.get("steps"):
    raise ConfigError("config.train.epochs must be > 0 (or set config.train.steps)")
  if cfg.get("dtype", "float32") not in ("float32", "bfloat16", "float16"):
    raise ConfigError(f"config.dtype={cfg.dtype!r}; use float32 or bfloat16")
  md = cfg.data.get("manual_dir", "")
  if cfg.data.get("name") not in ("orl", "synthetic") and md and not os.path.isdir(md):
    raise ConfigError(f"config.data.manual_dir={md!r} does not exist; point it at the folder "
                      "holding the data set's files (see docs/datasets.md)")
