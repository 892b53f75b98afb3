"""ImageNet ResNet-CBAM: shapes, parameter counts from layer shapes, a tiny forward."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from askd_jax.models.resnet import resnet_cbam

# torchvision's published parameter counts (torchvision.models docs).
PUBLISHED = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032, 101: 44_549_160}
LAYOUT = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
          50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3))}


def block_outputs(depth):
  """Output channels of every block, in order."""
  kind, sizes = LAYOUT[depth]
  exp = 4 if kind == "bottleneck" else 1
  return [64 * 2 ** i * exp for i, n in enumerate(sizes) for _ in range(n)]


def resnet_params(depth, classes=1000):
  """Parameters of torchvision's ResNet from its layer shapes (conv k*k*in*out, BN 2*C)."""
  kind, sizes = LAYOUT[depth]
  exp = 4 if kind == "bottleneck" else 1
  total = 7 * 7 * 3 * 64 + 2 * 64
  cin = 64
  for i, n in enumerate(sizes):
    w = 64 * 2 ** i
    for j in range(n):
      if kind == "bottleneck":
        total += cin * w + 9 * w * w + w * 4 * w + 2 * (w + w + 4 * w)
      else:
        total += 9 * cin * w + 9 * w * w + 2 * (w + w)
      if j == 0 and (i > 0 or cin != w * exp):
        total += cin * w * exp + 2 * w * exp   # projection shortcut
      cin = w * exp
  return total + cin * classes + classes


def cbam_params(depth):
  # Shared MLP C -> C/16 -> C without biases, 7x7 conv over (mean, max) -> 1.
  return sum(2 * c * (c // 16) + 7 * 7 * 2 for c in block_outputs(depth))


def shapes(model, size=224, batch=2):
  return jax.eval_shape(lambda: model.init_with_output(
      jax.random.key(0), jnp.zeros((batch, size, size, 3)), train=False))


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_resnet50_cbam_shapes_and_parameter_count():
  assert resnet_params(50) == PUBLISHED[50]   # the layer-shape formula is torchvision's
  (logits, f), variables = shapes(resnet_cbam(50))
  assert logits.shape == (2, 1000) and logits.dtype == jnp.float32
  assert count(variables["params"]) == PUBLISHED[50] + cbam_params(50)
  assert f.embedding.shape == (2, 2048) and f.embedding.dtype == jnp.float32
  assert [s.shape for s in f.stages] == [(2, 56, 56, 256), (2, 28, 28, 512),
                                         (2, 14, 14, 1024), (2, 7, 7, 2048)]
  widths = [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3
  sides = [56] * 3 + [28] * 4 + [14] * 6 + [7] * 3
  assert [c.shape for c in f.channel_maps] == [(2, w) for w in widths]
  assert [s.shape for s in f.spatial_maps] == [(2, h, h) for h in sides]
  assert all(m.dtype == jnp.float32 for m in f.channel_maps + f.spatial_maps)


@pytest.mark.parametrize("depth", [18, 34, 101])
def test_other_depths(depth):
  assert resnet_params(depth) == PUBLISHED[depth]
  (logits, f), variables = shapes(resnet_cbam(depth), size=64, batch=1)
  assert logits.shape == (1, 1000)
  assert count(variables["params"]) == PUBLISHED[depth] + cbam_params(depth)
  assert len(f.channel_maps) == len(f.spatial_maps) == sum(LAYOUT[depth][1])
  assert [c.shape[-1] for c in f.channel_maps] == block_outputs(depth)
  last = 2048 if depth == 101 else 512
  assert f.stages[-1].shape == (1, 2, 2, last) and f.embedding.shape == (1, last)


def test_bad_depth_message():
  with pytest.raises(ValueError, match="depth=42"):
    resnet_cbam(42)


def test_small_forward_train_and_backbone_mode():
  model = resnet_cbam(50, num_classes=10, width=8, stage_sizes=(1, 1, 1, 1))
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  # rbg keys compile init about twice as fast as threefry on CPU.
  variables = jax.jit(lambda k: model.init(k, x))(jax.random.key(0, impl="rbg"))
  # torchvision init: kaiming normal, fan_out, gain sqrt(2): stem std sqrt(2 / (49 * 8)).
  stem = np.asarray(variables["params"]["stem_conv"]["kernel"])
  assert abs(stem.std() / np.sqrt(2 / (49 * 8)) - 1) < 0.1
  fwd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
  (logits, f), new = fwd(variables, x)
  assert logits.shape == (2, 10) and np.all(np.isfinite(logits))
  assert len(f.channel_maps) == 4 and f.spatial_maps[0].shape == (2, 8, 8)
  assert all(np.all(np.isfinite(m)) for m in f.channel_maps + f.spatial_maps)
  before = variables["batch_stats"]["stem_bn"]["mean"]
  assert not np.allclose(new["batch_stats"]["stem_bn"]["mean"], before)  # stats updated
  # eval mode uses the running statistics and is deterministic
  ev = jax.jit(lambda v, x: model.apply(v, x, train=False))
  np.testing.assert_array_equal(ev(variables, x)[0], ev(variables, x)[0])
  backbone = resnet_cbam(50, num_classes=None, width=8, stage_sizes=(1, 1, 1, 1))
  stages, f2 = jax.jit(lambda v, x: backbone.apply(v, x, train=False))(variables, x)
  assert [s.shape[-1] for s in stages] == [32, 64, 128, 256]
  np.testing.assert_allclose(f2.embedding, jnp.mean(stages[-1], axis=(1, 2)), rtol=1e-5)
