"""One device mesh for every platform: the batch is split on a 'data' axis.

Parameters and optimizer state are replicated (or, with `shard_params_over`, the large
margin weight and its optimizer state are split over the same axis). Under `jax.jit`,
XLA inserts the collectives; BatchNorm statistics are therefore over the global batch,
exactly as on one device.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def make_mesh(devices: Optional[list] = None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def state_shardings(state, mesh: Mesh, shard_min_size: int = 0):
  """Replicate everything; if shard_min_size > 0, split leaves at least that large on axis 0.

  Splitting the first axis of big leaves (the ArcFace weight (classes, D) and its momentum)
  over the data axis keeps per-device memory flat in the number of identities.
  """
  n = mesh.devices.size

  def pick(x):
    shape = getattr(x, "shape", ())
    if shard_min_size and len(shape) >= 1 and np.prod(shape) >= shard_min_size and shape[0] % n == 0:
      return NamedSharding(mesh, P(DATA))
    return NamedSharding(mesh, P())

  return jax.tree.map(pick, state)


def global_batch(local: Any, sharding: NamedSharding) -> Any:
  """Per-process numpy batch -> one global jax.Array per leaf (multi-host safe)."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local)
