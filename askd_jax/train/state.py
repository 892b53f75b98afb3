"""The train state: everything a step changes, and so everything a checkpoint holds."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
  step: jax.Array            # int32 scalar
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array             # uint32 key data (raw, so orbax and jnp.where treat it as an array)
  bad_steps: jax.Array       # int32: steps whose loss or gradient was not finite (skipped)
  first_bad_step: jax.Array  # int32: step of the first non-finite loss, -1 if none
  bad_terms: Any             # the loss terms of that first step (for the error message)
