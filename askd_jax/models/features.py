"""The features pytree every backbone returns beside its output.

Distillation methods read only this structure, so a method written once works for
the face, classification and detection backbones alike.
"""
from __future__ import annotations

from typing import Tuple

import flax.struct
import jax


@flax.struct.dataclass
class Features:
  """What a distillation method may look at.

  embedding:    (B, D) penultimate feature (face embedding before the margin; pooled
                feature for classification; for detection the pooled last stage).
  stages:       the four stage outputs, each (B, H, W, C).
  channel_maps: per CBAM block, the PRE-sigmoid channel attention map, (B, C).
  spatial_maps: per CBAM block, the PRE-sigmoid spatial attention map, (B, H, W).
  All attention maps are float32 whatever the compute dtype.
  """
  embedding: jax.Array
  stages: Tuple[jax.Array, ...]
  channel_maps: Tuple[jax.Array, ...]
  spatial_maps: Tuple[jax.Array, ...]
