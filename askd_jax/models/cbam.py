"""CBAM (Woo et al. 2018) as the A-SKD code uses it, exposing the pre-sigmoid maps."""
from __future__ import annotations

import functools
from typing import Any, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from askd_jax import ops
from askd_jax.models.layers import conv

Dtype = Any


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def gate_channels(x: jax.Array, s: jax.Array, cpu: bool) -> jax.Array:
  """x (B, H, W, C) * s (B, C) (float32) per channel; the gate's gradient is
  `ops.spatial_sum`."""
  return x * s.astype(x.dtype)[:, None, None, :]


def _gate_fwd(x, s, cpu):
  return gate_channels(x, s, cpu), (x, s)


def _gate_bwd(cpu, res, g):
  x, s = res
  dx = g * s.astype(g.dtype)[:, None, None, :]
  return dx, ops.spatial_sum(g.astype(jnp.float32) * x.astype(jnp.float32), cpu=cpu)


gate_channels.defvjp(_gate_fwd, _gate_bwd)


class ChannelAttention(nn.Module):
  """Shared MLP over avg- and max-pooled features; returns (x * sigmoid(a), a), a: (B, C)."""
  reduction: int = 16
  dtype: Dtype = jnp.float32
  cpu_ops: bool = False  # askd_jax.ops' XLA:CPU formulations (see models/layers.py)

  @nn.compact
  def __call__(self, x: jax.Array) -> Tuple[jax.Array, jax.Array]:
    c = x.shape[-1]
    hidden = max(c // self.reduction, 1)
    dense = lambda f, name: nn.Dense(f, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                                     kernel_init=nn.initializers.xavier_uniform(), name=name)
    # One matmul for both pooled vectors: (2, B, C) -> (2, B, C/r) -> (2, B, C). Stacked on a
    # new axis, not concatenated on the batch axis and sliced at B: jax2onnx
    # (tools/onnx_export.py) mislabels the shape of a symbolic batch's concat and slices.
    avg = (ops.spatial_sum(x, cpu=self.cpu_ops) / (x.shape[1] * x.shape[2])).astype(x.dtype)
    pooled = jnp.stack([avg, ops.spatial_max(x, cpu=self.cpu_ops)])
    h = dense(c, "fc2")(nn.relu(dense(hidden, "fc1")(pooled)))
    att = (h[0] + h[1]).astype(jnp.float32)  # (B, C), pre-sigmoid
    return gate_channels(x, jax.nn.sigmoid(att), self.cpu_ops), att


class SpatialAttention(nn.Module):
  """conv(concat(mean_c, max_c)) -> (x * sigmoid(s), s), s: (B, H, W).

  kernel_size 3 in the A-SKD iResNet, 7 in the original CBAM (ResNet, TinaFace).
  """
  kernel_size: int = 3
  dtype: Dtype = jnp.float32
  cpu_ops: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> Tuple[jax.Array, jax.Array]:
    pooled = jnp.concatenate([jnp.mean(x, axis=-1, keepdims=True),
                              jnp.max(x, axis=-1, keepdims=True)], axis=-1)
    att = conv(1, self.kernel_size, dtype=self.dtype, cpu_ops=self.cpu_ops,
               name="conv")(pooled)[..., 0]
    att = att.astype(jnp.float32)  # (B, H, W), pre-sigmoid
    return x * jax.nn.sigmoid(att).astype(x.dtype)[..., None], att


class CBAM(nn.Module):
  """Channel then spatial attention; returns (out, channel_map, spatial_map)."""
  reduction: int = 16
  spatial_kernel: int = 3
  dtype: Dtype = jnp.float32
  cpu_ops: bool = False

  @nn.compact
  def __call__(self, x):
    x, ca = ChannelAttention(self.reduction, self.dtype, self.cpu_ops, name="channel")(x)
    x, sa = SpatialAttention(self.spatial_kernel, self.dtype, self.cpu_ops, name="spatial")(x)
    return x, ca, sa
