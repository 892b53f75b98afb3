"""TinaFace (Zhu et al. 2020) with a ResNet-50-CBAM backbone: the A-SKD detector.

Follows vedadet's `tinaface_r50_fpn_bn` config (the public TinaFace code), NHWC:
  backbone  ResNet-50-CBAM (models/resnet.py) -> C2..C5, strides 4, 8, 16, 32
  FPN       lateral conv1x1+norm on C2..C5, top-down bilinear upsample + add,
            conv3x3+norm on each; P6 = conv3x3/2+norm on C5 ("on_input"),
            P7 = conv3x3/2+norm on P6; no activations; 6 levels, strides 4..128
  Inception one module shared by all levels: concat(3x3 -> C/2, 3x3 -> C/4 -> 3x3 -> C/4,
            3x3 -> C/4 -> 3x3 -> C/4 -> 3x3 -> C/4) -> ReLU (norm after every conv)
  head      shared by all levels, IoU-aware RetinaNet: cls and reg towers of 4 x
            (conv3x3 256 + norm + ReLU); cls conv3x3 -> A, box conv3x3 -> 4A and
            IoU conv3x3 -> A both on the reg tower
  anchors   per level base size = stride, scales 2^(4/3) * 2^(i/3) (i = 0, 1, 2),
            aspect ratio h/w = 1.3, centred on the grid points (k * stride, no half-cell
            offset), ordered (y, x, anchor) like the flattened NHWC head output.
Norm: `norm="bn"` (default) is vedadet's BN variant, PyTorch-semantics BatchNorm, so the
whole detector shares one normalisation with the backbone and batch-8 training. Inception
and the head are shared by the 6 levels; with `bn_per_level=True` (default) their convs are
shared but every level has its own BatchNorm (`bn0`..`bn5`), as EfficientDet's shared head:
one BN shared by all levels (vedadet, `bn_per_level=False`) keeps a single set of running
statistics, a momentum mix of levels whose activations differ, so eval mode drifts from
train mode (docs/widerface.md measured 15 AP instead of ~89 on the small preset). The paper
ran TinaFace's GN + DCN variant; `norm="gn"` gives GroupNorm(32) in the neck and head (the
backbone stays BN: it is the ImageNet ResNet-CBAM); deformable convolutions are not
implemented.
Init as vedadet: xavier-uniform in FPN/Inception, N(0, 0.01) in the head towers and the
cls conv (bias -log(99), prior 0.01), zeros for the box and IoU convs.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from askd_jax.models.features import Features
from askd_jax.models.layers import BatchNorm
from askd_jax.models.resnet import BottleneckCBAM, ResNetCBAM

Dtype = Any

STRIDES = (4, 8, 16, 32, 64, 128)
OCTAVE_BASE_SCALE = 2 ** (4 / 3)
SCALES_PER_OCTAVE = 3
RATIOS = (1.3,)  # height / width
PRIOR_PROB = 0.01


def _conv(features: int, kernel: int, stride: int = 1, *, init, dtype: Dtype, use_bias: bool,
          bias_init=nn.initializers.zeros, name: Optional[str] = None) -> nn.Conv:
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=use_bias, dtype=dtype,
                 param_dtype=jnp.float32, kernel_init=init, bias_init=bias_init, name=name)


class ConvNorm(nn.Module):
  """conv (no bias) -> norm -> optional ReLU (mmcv ConvModule with a norm)."""
  features: int
  kernel: int = 3
  stride: int = 1
  relu: bool = False
  norm: str = "bn"
  init: Any = nn.initializers.xavier_uniform()
  dtype: Dtype = jnp.float32
  cpu_ops: bool = False

  @nn.compact
  def __call__(self, x, train: bool, level: Optional[int] = None):
    """`level`: the FPN level of a conv shared by all levels; BN is then `bn{level}`."""
    x = _conv(self.features, self.kernel, self.stride, init=self.init, dtype=self.dtype,
              use_bias=False, name="conv")(x)
    if self.norm == "bn":
      x = BatchNorm(dtype=self.dtype, cpu_ops=self.cpu_ops,
                    name="bn" if level is None else f"bn{level}")(x, train)
    else:
      x = nn.GroupNorm(num_groups=32, epsilon=1e-5, dtype=self.dtype, param_dtype=jnp.float32,
                       name="gn")(x)
    return nn.relu(x) if self.relu else x


class FPN(nn.Module):
  """C2..C5 -> P2..P7 (6 levels), `channels` each."""
  channels: int = 256
  norm: str = "bn"
  dtype: Dtype = jnp.float32
  cpu_ops: bool = False

  @nn.compact
  def __call__(self, inputs: Sequence[jax.Array], train: bool) -> Tuple[jax.Array, ...]:
    cn = lambda k, s, name: ConvNorm(self.channels, k, s, norm=self.norm, dtype=self.dtype,
                                     cpu_ops=self.cpu_ops, name=name)
    lat = [cn(1, 1, f"lateral{i}")(c, train) for i, c in enumerate(inputs)]
    for i in range(len(lat) - 1, 0, -1):
      b, h, w, c = lat[i - 1].shape  # resize to the exact size: odd inputs round up
      lat[i - 1] = lat[i - 1] + jax.image.resize(lat[i], (b, h, w, c), "bilinear")
    outs = [cn(3, 1, f"fpn{i}")(x, train) for i, x in enumerate(lat)]
    outs.append(cn(3, 2, "extra0")(inputs[-1], train))  # P6 from C5
    outs.append(cn(3, 2, "extra1")(outs[-1], train))    # P7 from P6
    return tuple(outs)


class Inception(nn.Module):
  """TinaFace's Inception block (3x3, 5x5 and 7x7 receptive fields from stacked 3x3)."""
  channels: int = 256
  norm: str = "bn"
  dtype: Dtype = jnp.float32
  cpu_ops: bool = False

  @nn.compact
  def __call__(self, x, train: bool, level: Optional[int] = None):
    c = self.channels
    if c % 4:
      raise ValueError(f"Inception channels={c} must be divisible by 4")
    cn = lambda f, relu, name: ConvNorm(f, 3, 1, relu, self.norm, dtype=self.dtype,
                                        cpu_ops=self.cpu_ops, name=name)
    x3 = cn(c // 2, False, "b3")(x, train, level)
    x5_1 = cn(c // 4, True, "b5_1")(x, train, level)
    x5 = cn(c // 4, False, "b5_2")(x5_1, train, level)
    x7_2 = cn(c // 4, True, "b7_2")(x5_1, train, level)
    x7 = cn(c // 4, False, "b7_3")(x7_2, train, level)
    return nn.relu(jnp.concatenate([x3, x5, x7], axis=-1))


class IoUAwareHead(nn.Module):
  """x (B, H, W, C) -> cls (B, H, W, A), box (B, H, W, 4A), iou (B, H, W, A) logits."""
  channels: int = 256
  num_anchors: int = 3
  stacked_convs: int = 4
  norm: str = "bn"
  dtype: Dtype = jnp.float32
  cpu_ops: bool = False

  @nn.compact
  def __call__(self, x, train: bool, level: Optional[int] = None):
    std001 = nn.initializers.normal(0.01)
    cls_feat, reg_feat = x, x
    for i in range(self.stacked_convs):
      cls_feat = ConvNorm(self.channels, 3, 1, True, self.norm, std001, self.dtype, self.cpu_ops,
                          name=f"cls_conv{i}")(cls_feat, train, level)
      reg_feat = ConvNorm(self.channels, 3, 1, True, self.norm, std001, self.dtype, self.cpu_ops,
                          name=f"reg_conv{i}")(reg_feat, train, level)
    prior = nn.initializers.constant(-math.log((1 - PRIOR_PROB) / PRIOR_PROB))
    zeros = nn.initializers.zeros
    a = self.num_anchors
    cls = _conv(a, 3, init=std001, bias_init=prior, dtype=self.dtype, use_bias=True,
                name="cls")(cls_feat)
    box = _conv(4 * a, 3, init=zeros, dtype=self.dtype, use_bias=True, name="box")(reg_feat)
    iou = _conv(a, 3, init=zeros, dtype=self.dtype, use_bias=True, name="iou")(reg_feat)
    return cls, box, iou


def level_sizes(image_size, strides: Sequence[int] = STRIDES) -> Tuple[Tuple[int, int], ...]:
  """Feature-map sizes per level: every stride-2 layer (pad k//2) maps n -> ceil(n / 2)."""
  h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
  sizes = []
  for s in strides:
    k = int(round(math.log2(s)))
    if 2 ** k != s:
      raise ValueError(f"anchor stride {s} must be a power of two")
    hh, ww = h, w
    for _ in range(k):
      hh, ww = -(-hh // 2), -(-ww // 2)
    sizes.append((hh, ww))
  return tuple(sizes)


def base_anchors(stride: int, octave_base_scale: float = OCTAVE_BASE_SCALE,
                 scales_per_octave: int = SCALES_PER_OCTAVE,
                 ratios: Sequence[float] = RATIOS) -> np.ndarray:
  """(A, 4) x1y1x2y2 anchors centred at (0, 0), ratio-major then scale, as vedadet."""
  scales = octave_base_scale * 2.0 ** (np.arange(scales_per_octave) / scales_per_octave)
  h_ratio = np.sqrt(np.asarray(ratios, np.float64))
  ws = (stride / h_ratio[:, None] * scales[None, :]).reshape(-1)
  hs = (stride * h_ratio[:, None] * scales[None, :]).reshape(-1)
  return np.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], axis=-1)


def make_anchors(image_size, strides: Sequence[int] = STRIDES, **kw) -> np.ndarray:
  """All anchors of an input size, (A_total, 4) float32 x1y1x2y2, levels concatenated."""
  out = []
  for s, (h, w) in zip(strides, level_sizes(image_size, strides)):
    ys, xs = np.meshgrid(np.arange(h) * s, np.arange(w) * s, indexing="ij")
    shifts = np.stack([xs, ys, xs, ys], axis=-1).reshape(-1, 1, 4)  # (H*W, 1, 4), row-major
    out.append((shifts + base_anchors(s, **kw)[None]).reshape(-1, 4))
  return np.concatenate(out).astype(np.float32)


class TinaFaceCBAM(nn.Module):
  """__call__(x (B, H, W, 3), train) -> ({'cls', 'box', 'iou'}, Features).

  cls (B, A_total, 1) and iou (B, A_total, 1) are logits, box (B, A_total, 4) are deltas
  (decode with askd_jax.detection.boxes.decode and `anchors_for`); all float32.
  Features come from the backbone: the four ResNet stages and every CBAM block's maps.
  """
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  fpn_channels: int = 256
  stacked_convs: int = 4
  norm: str = "bn"
  bn_per_level: bool = True
  strides: Sequence[int] = STRIDES
  octave_base_scale: float = OCTAVE_BASE_SCALE
  scales_per_octave: int = SCALES_PER_OCTAVE
  ratios: Sequence[float] = RATIOS
  dtype: Dtype = jnp.float32
  cpu_ops: bool = False  # askd_jax.ops' XLA:CPU formulations (see models/layers.py)

  @property
  def num_anchors(self) -> int:
    return self.scales_per_octave * len(self.ratios)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> Tuple[Dict[str, jax.Array], Features]:
    if self.norm not in ("bn", "gn"):
      raise ValueError(f"tinaface norm={self.norm!r} must be 'bn' or 'gn'")
    cpu = self.cpu_ops
    stages, feats = ResNetCBAM(self.stage_sizes, BottleneckCBAM, num_classes=None,
                               width=self.width, dtype=self.dtype, cpu_ops=cpu,
                               name="backbone")(x, train)
    levels = FPN(self.fpn_channels, self.norm, self.dtype, cpu, name="fpn")(stages, train)
    neck = Inception(self.fpn_channels, self.norm, self.dtype, cpu, name="inception")
    head = IoUAwareHead(self.fpn_channels, self.num_anchors, self.stacked_convs, self.norm,
                        self.dtype, cpu, name="head")
    cls, box, iou = [], [], []
    n = x.shape[0]
    for lvl, p in enumerate(levels):
      lvl = lvl if self.bn_per_level else None  # per-level BN in the shared neck and head
      c, b, i = head(neck(p, train, lvl), train, lvl)
      cls.append(c.reshape(n, -1, 1))  # (B, H*W*A, 1): (y, x, anchor) order
      box.append(b.reshape(n, -1, 4))
      iou.append(i.reshape(n, -1, 1))
    cat = lambda t: jnp.concatenate(t, axis=1).astype(jnp.float32)
    return {"cls": cat(cls), "box": cat(box), "iou": cat(iou)}, feats

  @nn.nowrap
  def anchors_for(self, image_size) -> np.ndarray:
    """(A_total, 4) x1y1x2y2 anchors matching the outputs for an input of image_size."""
    return make_anchors(image_size, self.strides, octave_base_scale=self.octave_base_scale,
                        scales_per_octave=self.scales_per_octave, ratios=self.ratios)


def tinaface_cbam(depth: int = 50, width: int = 64, fpn_channels: int = 256,
                  stage_sizes: Sequence[int] | None = None, **kw) -> TinaFaceCBAM:
  """TinaFace-CBAM; depth 50 (or 101) bottleneck backbone, small widths for tests."""
  sizes = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
  if stage_sizes is None:
    if depth not in sizes:
      raise ValueError(f"tinaface depth={depth} is not one of {sorted(sizes)} "
                       "(bottleneck backbones only)")
    stage_sizes = sizes[depth]
  return TinaFaceCBAM(stage_sizes=tuple(stage_sizes), width=width, fpn_channels=fpn_channels,
                      **kw)
