"""The one place that decides whether the XLA:CPU formulations of askd_jax.ops apply."""
from __future__ import annotations

from typing import Optional

import jax


def on_cpu(platform: Optional[str] = None) -> bool:
  """Whether `platform` (a device's `.platform`, e.g. the mesh's; default: JAX's default
  backend, where an unplaced computation traced now will run) is XLA:CPU."""
  return (platform or jax.default_backend()) == "cpu"
