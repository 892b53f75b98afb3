"""ImageNet ResNet with CBAM in every block (Woo et al. 2018), torchvision layout.

  stem:        conv7x7/2(64) -> BN -> ReLU -> max-pool 3x3/2         224 -> 112 -> 56
  basic (18/34):       r = conv3x3(s) -> BN -> ReLU -> conv3x3 -> BN
  bottleneck (50/101): r = conv1x1 -> BN -> ReLU -> conv3x3(s) -> BN -> ReLU
                           -> conv1x1(4x) -> BN                 (stride on the 3x3: "v1.5")
  every block:         r = CBAM(r) (7x7 spatial conv, reduction 16)
                       out = ReLU(shortcut + r), shortcut = identity or conv1x1(s) -> BN
  head:        global average pool (the embedding) -> Dense(num_classes)
Stages 1..4 at strides 4, 8, 16, 32 (56, 28, 14, 7 at 224 px).

The CBAM here is the project's (no MLP biases, no BN after the spatial conv), the
variant A-SKD distils; the original CBAM code adds both, a few thousand parameters.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from askd_jax.models.cbam import CBAM
from askd_jax.models.features import Features
from askd_jax.models.layers import BatchNorm, ops_conv

Dtype = Any

# torchvision initialises every conv with kaiming_normal_(mode="fan_out", relu), untruncated.
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv_kaiming(features: int, kernel: int, stride: int = 1, *, dtype: Dtype, cpu_ops: bool,
                 name: Optional[str] = None) -> nn.Conv:
  """Bias-free conv with PyTorch padding (kernel // 2) and torchvision's init."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype,
                 param_dtype=jnp.float32, kernel_init=kaiming_fan_out,
                 conv_general_dilated=ops_conv(cpu_ops), name=name)


class BasicBlockCBAM(nn.Module):
  """Two 3x3 convs; output width = features."""
  features: int
  stride: int = 1
  reduction: int = 16
  dtype: Dtype = jnp.float32
  cpu_ops: bool = False
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool):
    bn = lambda name: BatchNorm(dtype=self.dtype, cpu_ops=self.cpu_ops, name=name)
    cv = lambda f, k, s, name: conv_kaiming(f, k, s, dtype=self.dtype, cpu_ops=self.cpu_ops,
                                            name=name)
    r = cv(self.features, 3, self.stride, "conv1")(x)
    r = nn.relu(bn("bn1")(r, train))
    r = cv(self.features, 3, 1, "conv2")(r)
    r = bn("bn2")(r, train)
    return _cbam_add(self, x, r, self.features, train)


class BottleneckCBAM(nn.Module):
  """1x1 -> 3x3 (stride) -> 1x1 (4x features); output width = 4 * features."""
  features: int
  stride: int = 1
  reduction: int = 16
  dtype: Dtype = jnp.float32
  cpu_ops: bool = False
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool):
    bn = lambda name: BatchNorm(dtype=self.dtype, cpu_ops=self.cpu_ops, name=name)
    cv = lambda f, k, s, name: conv_kaiming(f, k, s, dtype=self.dtype, cpu_ops=self.cpu_ops,
                                            name=name)
    r = cv(self.features, 1, 1, "conv1")(x)
    r = nn.relu(bn("bn1")(r, train))
    r = cv(self.features, 3, self.stride, "conv2")(r)
    r = nn.relu(bn("bn2")(r, train))
    r = cv(self.features * 4, 1, 1, "conv3")(r)
    r = bn("bn3")(r, train)
    return _cbam_add(self, x, r, self.features * 4, train)


def _cbam_add(block: nn.Module, x, r, out_features: int, train: bool):
  """CBAM on the residual branch, projection shortcut if needed, ReLU after the add.

  Called inside a block's compact __call__, so the submodules are named in that block.
  """
  r, ca, sa = CBAM(block.reduction, 7, block.dtype, block.cpu_ops, name="cbam")(r)
  if x.shape[-1] != out_features or block.stride != 1:
    x = conv_kaiming(out_features, 1, block.stride, dtype=block.dtype, cpu_ops=block.cpu_ops,
                     name="downsample_conv")(x)
    x = BatchNorm(dtype=block.dtype, cpu_ops=block.cpu_ops, name="downsample_bn")(x, train)
  return nn.relu(x + r), ca, sa


BLOCKS = {18: (BasicBlockCBAM, (2, 2, 2, 2)), 34: (BasicBlockCBAM, (3, 4, 6, 3)),
          50: (BottleneckCBAM, (3, 4, 6, 3)), 101: (BottleneckCBAM, (3, 4, 23, 3))}


class ResNetCBAM(nn.Module):
  """__call__(x (B, H, W, 3), train) -> (logits (B, classes) f32, Features).

  With num_classes=None it is a detection backbone: returns (stages, Features), where
  stages are the four stage outputs (C2..C5, strides 4..32) in the compute dtype.
  Features.embedding is the global-average-pooled last stage, float32.
  """
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  block: Any = BottleneckCBAM
  num_classes: Optional[int] = 1000
  width: int = 64
  reduction: int = 16
  dtype: Dtype = jnp.float32
  cpu_ops: bool = False  # askd_jax.ops' XLA:CPU formulations (see models/layers.py)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    x = x.astype(self.dtype)
    x = conv_kaiming(self.width, 7, 2, dtype=self.dtype, cpu_ops=self.cpu_ops,
                     name="stem_conv")(x)
    x = nn.relu(BatchNorm(dtype=self.dtype, cpu_ops=self.cpu_ops, name="stem_bn")(x, train))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # pads with -inf
    stages, cmaps, smaps = [], [], []
    for i, n in enumerate(self.stage_sizes):
      for j in range(n):
        stride = 2 if (i > 0 and j == 0) else 1
        x, ca, sa = self.block(self.width * 2 ** i, stride, self.reduction, self.dtype,
                               self.cpu_ops, name=f"layer{i + 1}_{j}")(x, train)
        cmaps.append(ca)
        smaps.append(sa)
      stages.append(x)
    emb = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # (B, C)
    feats = Features(embedding=emb, stages=tuple(stages), channel_maps=tuple(cmaps),
                     spatial_maps=tuple(smaps))
    if self.num_classes is None:
      return tuple(stages), feats
    # torchvision keeps nn.Linear's default init: U(+-1/sqrt(fan_in)) for weight and bias.
    bound = 1.0 / float(emb.shape[-1]) ** 0.5
    uniform = lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                      kernel_init=uniform, bias_init=uniform, name="fc")(emb.astype(self.dtype))
    return logits.astype(jnp.float32), feats


def resnet_cbam(depth: int = 50, num_classes: Optional[int] = 1000, width: int = 64,
                stage_sizes: Sequence[int] | None = None, **kw) -> ResNetCBAM:
  """ResNet-CBAM of a torchvision depth (18/34/50/101); width=64 is the standard model.

  stage_sizes overrides the block counts (tiny models for tests and demos).
  """
  if depth not in BLOCKS:
    raise ValueError(f"resnet depth={depth} is not one of {sorted(BLOCKS)}")
  block, sizes = BLOCKS[depth]
  return ResNetCBAM(stage_sizes=tuple(stage_sizes or sizes), block=block,
                    num_classes=num_classes, width=width, **kw)
