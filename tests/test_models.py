"""Shapes, block counts and parameter counts of iResNet-CBAM against the official model."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from askd_jax.models import ArcFace, MarginModel, iresnet_cbam

OFFICIAL_STAGES = {50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 152: (3, 8, 36, 3)}


def _shapes(model, x_shape, dtype=jnp.float32, train=False):
  """(variables, (embedding, Features)) as ShapeDtypeStructs, nothing computed."""
  x = jax.ShapeDtypeStruct(x_shape, dtype)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  return variables, out


def _count(tree) -> int:
  return sum(math.prod(l.shape) for l in jax.tree.leaves(tree))


def official_param_count(stage_sizes, widths=(64, 128, 256, 512), emb=512, out_hw=7,
                         reduction=16) -> int:
  """Trainable parameters of the official CBAMResNet, layer by layer from its definition."""
  conv = lambda cin, cout, k: cin * cout * k * k  # bias=False everywhere
  bn = lambda c: 2 * c  # weight + bias (running stats are buffers)
  prelu = lambda c: c
  c0 = widths[0]
  n = conv(3, c0, 3) + bn(c0) + prelu(c0)  # input_layer
  cin = c0
  for blocks, c in zip(stage_sizes, widths):
    for j in range(blocks):
      b_in = cin if j == 0 else c
      n += bn(b_in) + conv(b_in, c, 3) + bn(c) + prelu(c) + conv(c, c, 3) + bn(c)  # res_layer
      n += conv(c, c // reduction, 1) + conv(c // reduction, c, 1)  # channel_layer.shared_mlp
      n += conv(2, 1, 3)  # spatial_layer.conv
      if j == 0:  # shortcut_layer (dim_match=False in every stage's first block)
        n += conv(b_in, c, 1) + bn(c)
    cin = c
  n += bn(cin) + (cin * out_hw * out_hw * emb + emb) + bn(emb)  # output_layer 0, 3, 4
  return n


@pytest.fixture(scope="module")
def r50_shapes():
  return _shapes(iresnet_cbam(50), (2, 112, 112, 3))


def test_iresnet50_feature_shapes(r50_shapes):
  _, (emb, feats) = r50_shapes
  assert emb.shape == (2, 512) and emb.dtype == jnp.float32
  assert feats.embedding.shape == (2, 512)
  assert len(feats.channel_maps) == len(feats.spatial_maps) == 24
  widths = [c.shape[-1] for c in feats.channel_maps]
  assert widths == [64] * 3 + [128] * 4 + [256] * 14 + [512] * 3
  assert all(c.shape == (2, w) for c, w in zip(feats.channel_maps, widths))
  sizes = [s.shape[1] for s in feats.spatial_maps]
  assert sizes == [56] * 3 + [28] * 4 + [14] * 14 + [7] * 3
  assert all(s.shape == (2, h, h) for s, h in zip(feats.spatial_maps, sizes))
  assert [s.shape for s in feats.stages] == [(2, 56, 56, 64), (2, 28, 28, 128),
                                             (2, 14, 14, 256), (2, 7, 7, 512)]


def test_iresnet50_param_count_matches_official(r50_shapes):
  variables, _ = r50_shapes
  expected = official_param_count(OFFICIAL_STAGES[50])
  assert _count(variables["params"]) == expected
  # 43.8M, 12.8M of it the 25088 x 512 embedding layer; a sanity bound on the formula.
  assert 40e6 < expected < 47e6


def test_param_count_matches_torch_reference(r50_shapes):
  torch = pytest.importorskip("torch", reason="torch (optional) builds the reference model")
  from askd_jax.tools import torch_reference as tr

  variables, _ = r50_shapes
  with torch.device("meta"):  # shapes only: no 43M-parameter init on the CPU
    net = tr.iresnet_cbam(50)
  assert sum(p.numel() for p in net.parameters()) == _count(variables["params"])
  buffers = sum(b.numel() for n, b in net.named_buffers() if "num_batches" not in n)
  assert buffers == _count(variables["batch_stats"])


@pytest.mark.parametrize("depth", [100, 152])
def test_deeper_block_counts(depth):
  variables, (emb, feats) = _shapes(iresnet_cbam(depth), (1, 112, 112, 3))
  stages = OFFICIAL_STAGES[depth]
  assert len(feats.channel_maps) == len(feats.spatial_maps) == sum(stages)
  for i, n in enumerate(stages):
    assert len([k for k in variables["params"] if k.startswith(f"layer{i + 1}_")]) == n
  assert _count(variables["params"]) == official_param_count(stages)
  assert emb.shape == (1, 512)


def test_unknown_depth_is_refused():
  with pytest.raises(ValueError, match="depth=34"):
    iresnet_cbam(34)


@pytest.mark.parametrize("size,spatial,run", [(32, [16, 8, 4, 2], True),
                                              (56, [28, 14, 7, 4], False)])
def test_small_variant(size, spatial, run):
  stage_sizes, widths = (1, 2, 1, 1), (16, 32, 64, 128)
  model = MarginModel(iresnet_cbam(stage_sizes=stage_sizes, width=0.25), ArcFace(num_classes=7))
  x = jax.random.uniform(jax.random.key(1), (2, size, size, 3), minval=-1, maxval=1)
  labels = jnp.array([0, 6])
  init = lambda x: model.init(jax.random.key(0), x, labels)
  fwd = lambda v, x: model.apply(v, x, labels, train=True, mutable=["batch_stats"],
                                 rngs={"dropout": jax.random.key(2)})[0]
  if run:  # one real forward (values, jitted); the other size only traces (shapes)
    variables = jax.jit(init)(x)
    out, feats = jax.jit(fwd)(variables, x)
    assert np.all(np.isfinite(out["embedding"])) and np.all(np.isfinite(out["logits"]))
  else:
    variables = jax.eval_shape(init, x)
    out, feats = jax.eval_shape(fwd, variables, x)
  assert out["embedding"].shape == (2, 512) and out["logits"].shape == (2, 7)
  assert [c.shape[-1] for c in feats.channel_maps] == [16, 32, 32, 64, 128]
  assert [s.shape[1] for s in feats.spatial_maps] == [spatial[0], spatial[1], spatial[1],
                                                       spatial[2], spatial[3]]
  assert [s.shape[1:] for s in feats.stages] == [(h, h, w) for h, w in zip(spatial, widths)]
  backbone = variables["params"]["backbone"]
  assert _count(backbone) == official_param_count(stage_sizes, widths, out_hw=spatial[3])
  assert backbone["fc"]["kernel"].shape == (spatial[3] ** 2 * 128, 512)
  assert variables["params"]["head"]["kernel"].shape == (7, 512)  # official (classes, 512)


def test_bfloat16_keeps_params_and_maps_float32():
  model = iresnet_cbam(stage_sizes=(1, 1, 1, 1), width=0.25, dtype=jnp.bfloat16)
  variables, (emb, feats) = _shapes(model, (2, 32, 32, 3))
  assert {l.dtype for l in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  assert emb.dtype == jnp.float32
  assert all(m.dtype == jnp.float32 for m in feats.channel_maps + feats.spatial_maps)
  assert all(s.dtype == jnp.bfloat16 for s in feats.stages)  # activations in compute dtype
