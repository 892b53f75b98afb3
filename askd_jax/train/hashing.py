"""The parameter hash that identifies a teacher: written by export and by stage checkpoints
(checkpoint.py, state_io.py), checked when a student stage loads or resumes."""
from __future__ import annotations

import hashlib

import jax
import numpy as np


def params_hash(tree) -> str:
  """A short, order-stable hash of a parameter tree (identifies a teacher)."""
  h = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(tree)[0],
                           key=lambda kv: jax.tree_util.keystr(kv[0])):
    a = np.asarray(jax.device_get(leaf))
    h.update(jax.tree_util.keystr(path).encode())
    h.update(str(a.dtype).encode() + str(a.shape).encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()[:16]
