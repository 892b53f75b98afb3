"""The one mapping from a platform to whether the XLA:CPU formulations of askd_jax.ops apply.

Tasks call it when they build a model (`Task.model(platform=...)`; the train loop passes
its mesh's platform), and the model carries the answer down as its `cpu_ops` field; the
train step's compiler options ask it for the mesh's platform too.
"""
from __future__ import annotations

from typing import Optional

import jax


def on_cpu(platform: Optional[str] = None) -> bool:
  """Whether `platform` (a device's `.platform`, e.g. the mesh's; default: JAX's default
  backend, where an unplaced computation runs) is XLA:CPU."""
  return (platform or jax.default_backend()) == "cpu"
