"""iResNet with CBAM in every bottleneck: the A-SKD face backbone.

Layer for layer the official `CBAMResNet` (BottleNeck_IR_CBAM), NHWC:
  stem:   conv3x3(64) -> BN -> PReLU
  block:  res = BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN -> CBAM(res)
          out = shortcut + res, shortcut = identity or conv1x1(stride) -> BN
  head:   BN -> Dropout(0.4) -> flatten -> Dense(512) -> BN1d  (the embedding)
Every stage halves the resolution in its first block: 112 -> 56 -> 28 -> 14 -> 7.
The flatten here is (H, W, C) order; the PyTorch one is (C, H, W): see tools/convert.py.
"""
from __future__ import annotations

from typing import Any, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from askd_jax.models.cbam import CBAM
from askd_jax.models.features import Features
from askd_jax.models.layers import BatchNorm, PReLU, conv

Dtype = Any

STAGE_SIZES = {50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 152: (3, 8, 36, 3)}
WIDTHS = (64, 128, 256, 512)


class BottleneckIRCBAM(nn.Module):
  features: int
  stride: int
  reduction: int = 16
  dtype: Dtype = jnp.float32
  cpu_ops: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    cpu = self.cpu_ops
    bn = lambda name: BatchNorm(dtype=self.dtype, cpu_ops=cpu, name=name)
    r = bn("bn1")(x, train)
    r = conv(self.features, 3, dtype=self.dtype, cpu_ops=cpu, name="conv1")(r)
    r = bn("bn2")(r, train)
    r = PReLU(cpu_ops=cpu, name="prelu")(r)
    r = conv(self.features, 3, self.stride, dtype=self.dtype, cpu_ops=cpu, name="conv2")(r)
    r = bn("bn3")(r, train)
    r, ca, sa = CBAM(self.reduction, 3, self.dtype, cpu, name="cbam")(r)
    if x.shape[-1] != self.features or self.stride != 1:
      x = conv(self.features, 1, self.stride, dtype=self.dtype, cpu_ops=cpu,
               name="shortcut_conv")(x)
      x = bn("shortcut_bn")(x, train)
    return x + r, ca, sa


class IResNetCBAM(nn.Module):
  """Returns (embedding (B, D) float32, Features)."""
  stage_sizes: Sequence[int] = STAGE_SIZES[50]
  widths: Sequence[int] = WIDTHS
  stem_width: int = 64
  embedding_dim: int = 512
  dropout: float = 0.4
  reduction: int = 16
  dtype: Dtype = jnp.float32
  cpu_ops: bool = False  # askd_jax.ops' XLA:CPU formulations (see models/layers.py)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> Tuple[jax.Array, Features]:
    cpu = self.cpu_ops
    x = x.astype(self.dtype)
    x = conv(self.stem_width, 3, dtype=self.dtype, cpu_ops=cpu, name="stem_conv")(x)
    x = BatchNorm(dtype=self.dtype, cpu_ops=cpu, name="stem_bn")(x, train)
    x = PReLU(cpu_ops=cpu, name="stem_prelu")(x)
    stages, cmaps, smaps = [], [], []
    for i, (n, w) in enumerate(zip(self.stage_sizes, self.widths)):
      for j in range(n):
        x, ca, sa = BottleneckIRCBAM(w, 2 if j == 0 else 1, self.reduction, self.dtype, cpu,
                                     name=f"layer{i + 1}_{j}")(x, train)
        cmaps.append(ca)
        smaps.append(sa)
      stages.append(x)
    x = BatchNorm(dtype=self.dtype, cpu_ops=cpu, name="out_bn")(x, train)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.Dense(self.embedding_dim, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=nn.initializers.xavier_uniform(), name="fc")(x)
    emb = BatchNorm(dtype=jnp.float32, cpu_ops=cpu, name="fc_bn")(x.astype(jnp.float32), train)
    return emb, Features(embedding=emb, stages=tuple(stages), channel_maps=tuple(cmaps),
                         spatial_maps=tuple(smaps))


def iresnet_cbam(depth: int = 50, width: float = 1.0, stage_sizes: Sequence[int] | None = None,
                 **kw) -> IResNetCBAM:
  """iResNet-CBAM of an official depth (50/100/152), or small variants for tests/demo.

  width scales every channel count (0.25 -> 16/32/64/128); stage_sizes overrides depth.
  """
  if stage_sizes is None:
    if depth not in STAGE_SIZES:
      raise ValueError(f"iresnet depth={depth} is not one of {sorted(STAGE_SIZES)}; "
                       "pass stage_sizes=(a, b, c, d) for a custom depth")
    stage_sizes = STAGE_SIZES[depth]
  widths = tuple(max(int(round(c * width)), 1) for c in WIDTHS)
  return IResNetCBAM(stage_sizes=tuple(stage_sizes), widths=widths,
                     stem_width=widths[0], **kw)
