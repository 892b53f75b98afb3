"""PyTorch reference of the official A-SKD face model, for parity tests and benchmarks.

Written from the facts in askd_facts.md (not copied): the official `CBAMResNet`
(iResNet-CBAM, NCHW) with the official parameter names, so its `state_dict()` has the
layout of the authors' `*_net.ckpt` files, and the official `ArcMarginProduct`.

Beyond the official model it allows small variants (a width multiplier, custom stage
sizes, any input size) so tests run fast; at depth 50/100/152, width 1
and 112 px it is layer for layer the official network. The forward returns what A-SKD
distils (no hooks): the embedding, the 4 stage outputs and, per CBAM block, the
pre-sigmoid channel map (B, C) and spatial map (B, H, W).

Only import this module when torch is installed.
"""
from __future__ import annotations

import math
from typing import Dict, List, NamedTuple, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

STAGE_SIZES = {50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 152: (3, 8, 36, 3)}
WIDTHS = (64, 128, 256, 512)


class TorchFeatures(NamedTuple):
  """Mirror of askd_jax.models.Features, in PyTorch layout (stages are NCHW)."""
  embedding: torch.Tensor
  stages: Tuple[torch.Tensor, ...]
  channel_maps: Tuple[torch.Tensor, ...]  # (B, C) pre-sigmoid
  spatial_maps: Tuple[torch.Tensor, ...]  # (B, H, W) pre-sigmoid


class Flatten(nn.Module):

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)  # (B, C*H*W): channel-major, unlike NHWC


class ChannelAttention(nn.Module):
  """Official CAModule: a shared 1x1-conv MLP on the avg- and max-pooled features."""

  def __init__(self, channels: int, reduction: int = 16):
    super().__init__()
    hidden = max(channels // reduction, 1)  # official: channels // 16 (>= 1 for C >= 16)
    self.shared_mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.ReLU(),
                                    nn.Conv2d(hidden, channels, 1, bias=False))

  def forward(self, x):
    att = (self.shared_mlp(F.adaptive_avg_pool2d(x, 1)) +
           self.shared_mlp(F.adaptive_max_pool2d(x, 1)))  # (B, C, 1, 1)
    return x * torch.sigmoid(att), att.flatten(1)


class SpatialAttention(nn.Module):
  """Official SAModule: conv3x3 over (mean over C, max over C)."""

  def __init__(self):
    super().__init__()
    self.conv = nn.Conv2d(2, 1, 3, padding=1, bias=False)

  def forward(self, x):
    pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
    att = self.conv(pooled)  # (B, 1, H, W)
    return x * torch.sigmoid(att), att[:, 0]


class BottleneckIRCBAM(nn.Module):
  """Official BottleNeck_IR_CBAM; `shortcut_layer` exists only when dims change."""

  def __init__(self, cin: int, cout: int, stride: int, dim_match: bool, reduction: int = 16):
    super().__init__()
    self.res_layer = nn.Sequential(
        nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
        nn.PReLU(cout), nn.Conv2d(cout, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))
    self.channel_layer = ChannelAttention(cout, reduction)
    self.spatial_layer = SpatialAttention()
    self.shortcut_layer = None if dim_match else nn.Sequential(
        nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

  def forward(self, x):
    res = self.res_layer(x)
    res, ca = self.channel_layer(res)
    res, sa = self.spatial_layer(res)
    shortcut = x if self.shortcut_layer is None else self.shortcut_layer(x)
    return shortcut + res, ca, sa


class IResNetCBAM(nn.Module):
  """Official CBAMResNet, generalised to any stage sizes, widths and input size."""

  def __init__(self, stage_sizes: Sequence[int] = STAGE_SIZES[50],
               widths: Sequence[int] = WIDTHS, embedding_dim: int = 512,
               input_size: int = 112, drop_ratio: float = 0.4, reduction: int = 16):
    super().__init__()
    self.stage_sizes, self.widths = tuple(stage_sizes), tuple(widths)
    out_hw = output_size(input_size)
    self.input_layer = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
                                     nn.BatchNorm2d(widths[0]), nn.PReLU(widths[0]))
    cin = widths[0]
    for i, (n, cout) in enumerate(zip(stage_sizes, widths)):
      blocks = [BottleneckIRCBAM(cin if j == 0 else cout, cout, 2 if j == 0 else 1, j > 0,
                                 reduction) for j in range(n)]
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
      cin = cout
    self.output_layer = nn.Sequential(
        nn.BatchNorm2d(cin), nn.Dropout(drop_ratio), Flatten(),
        nn.Linear(cin * out_hw * out_hw, embedding_dim), nn.BatchNorm1d(embedding_dim))
    for m in self.modules():  # official init
      if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
          nn.init.zeros_(m.bias)
      elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)

  def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, TorchFeatures]:
    """x: (B, 3, H, W) in the official channel order (BGR) -> (embedding, features)."""
    x = self.input_layer(x)
    stages, cmaps, smaps = [], [], []
    for i in range(len(self.stage_sizes)):
      for block in getattr(self, f"layer{i + 1}"):
        x, ca, sa = block(x)
        cmaps.append(ca)
        smaps.append(sa)
      stages.append(x)
    emb = self.output_layer(x)
    return emb, TorchFeatures(emb, tuple(stages), tuple(cmaps), tuple(smaps))


def output_size(input_size: int) -> int:
  """Side of the last stage: four 3x3, stride-2, padding-1 convs (112 -> 7, 56 -> 4)."""
  h = input_size
  for _ in range(4):
    h = (h - 1) // 2 + 1
  return h


def widths_for(width: float = 1.0) -> Tuple[int, ...]:
  """Channel counts for a width multiplier, the same rounding as askd_jax.models."""
  return tuple(max(int(round(c * width)), 1) for c in WIDTHS)


def iresnet_cbam(depth: int = 50, width: float = 1.0, stage_sizes: Sequence[int] | None = None,
                 input_size: int = 112, **kw) -> IResNetCBAM:
  """Official iResNet{depth}-CBAM (width 1, 112 px) or a small variant."""
  if stage_sizes is None:
    if depth not in STAGE_SIZES:
      raise ValueError(f"depth={depth} is not one of {sorted(STAGE_SIZES)}; pass stage_sizes")
    stage_sizes = STAGE_SIZES[depth]
  return IResNetCBAM(stage_sizes, widths_for(width), input_size=input_size, **kw)


class ArcMarginProduct(nn.Module):
  """Official ArcFace margin (easy_margin=False branch); weight (classes, in_feature)."""

  def __init__(self, in_feature: int = 512, out_feature: int = 10572, s: float = 32.0,
               m: float = 0.5):
    super().__init__()
    self.s, self.m = s, m
    self.weight = nn.Parameter(torch.empty(out_feature, in_feature))
    nn.init.xavier_uniform_(self.weight)
    self.th = math.cos(math.pi - m)  # beyond theta = pi - m, cos(theta + m) is not monotone
    self.mm = math.sin(math.pi - m) * m

  def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    cosine = F.linear(F.normalize(x), F.normalize(self.weight))
    sine = torch.sqrt(1.0 - cosine.pow(2))
    phi = cosine * math.cos(self.m) - sine * math.sin(self.m)
    phi = torch.where(cosine - self.th > 0, phi, cosine - self.mm)
    one_hot = F.one_hot(label, cosine.shape[1]).to(cosine.dtype)
    return self.s * (one_hot * phi + (1.0 - one_hot) * cosine)


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
  """Give BN affine/statistics, PReLU slopes and Linear biases random values.

  Parity of a freshly initialised model would not exercise the running statistics,
  BN scales or slopes; random ones make every converted tensor matter.
  """
  g = torch.Generator().manual_seed(seed)
  u = lambda t, lo, hi: t.copy_(lo + (hi - lo) * torch.rand(t.shape, generator=g))
  for m in model.modules():
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
      u(m.weight, 0.5, 1.5)
      u(m.bias, -0.2, 0.2)
      u(m.running_mean, -0.2, 0.2)
      u(m.running_var, 0.5, 1.5)
    elif isinstance(m, nn.PReLU):
      u(m.weight, 0.0, 0.5)
    elif isinstance(m, nn.Linear) and m.bias is not None:
      u(m.bias, -0.2, 0.2)
  return model


def numpy_state(module: nn.Module) -> Dict[str, np.ndarray]:
  """state_dict as numpy arrays (what askd_jax.tools.convert's pure functions take)."""
  return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def block_names(model: IResNetCBAM) -> List[str]:
  """'layer{i}.{j}' for every CBAM block, in forward order (the order of the maps)."""
  return [f"layer{i + 1}.{j}" for i, n in enumerate(model.stage_sizes) for j in range(n)]
