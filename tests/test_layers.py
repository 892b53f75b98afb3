"""models/layers.py's conv helper (BN and PReLU: torch parity in test_parity_model.py), and
the `cpu_ops` field the task sets from the platform and every layer passes down."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from askd_jax import ops
from askd_jax.models import layers


@pytest.mark.parametrize("cpu_ops", [True, False])
def test_conv_layer_uses_ops_convolution_and_keeps_its_params(cpu_ops):
  """layers.conv: askd_jax.ops' convolution, the same parameters and output as nn.Conv."""
  import flax.linen as nn
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  ours = layers.conv(8, 3, 2, dtype=jnp.float32, cpu_ops=cpu_ops)
  plain = nn.Conv(8, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=False)
  assert ours.conv_general_dilated.func is ops.conv_general_dilated
  assert ours.conv_general_dilated.keywords == {"cpu": cpu_ops}
  v = ours.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, v) == jax.tree.map(jnp.shape, plain.init(jax.random.key(0), x))
  np.testing.assert_allclose(ours.apply(v, x), plain.apply(v, x), rtol=1e-6, atol=1e-6)


def test_the_task_sets_cpu_ops_from_the_platform_and_the_params_stay():
  """FaceRecTask.model(platform=...): on 'cpu' every layer takes the XLA:CPU formulations
  (the BN backward in a fusion region, a lax.cond), elsewhere XLA's plain ops; the parameter
  tree is the same (checkpoints and the converter read either), and so are the values and
  gradients up to float32 rounding."""
  import configs.facerec as fr
  from askd_jax.tasks.facerec import FaceRecTask
  c = fr.get_config("demo")
  c.model.width, c.model.embedding_dim, c.data.image_size = 0.125, 8, 16
  task = FaceRecTask(c)
  spec = dict(task=task.name, arch="iresnet_cbam", width=0.125, stage_sizes=[1, 1, 1, 1],
              embedding_dim=8, num_classes=5, input_size=16)
  on_cpu, plain = task.model(spec=spec, platform="cpu"), task.model(spec=spec, platform="gpu")
  assert on_cpu.backbone.cpu_ops and not plain.backbone.cpu_ops
  assert task.model(spec=spec).backbone.cpu_ops == ops.on_cpu()
  x = jax.random.uniform(jax.random.key(0), (4, 16, 16, 3), minval=-1.0, maxval=1.0)
  labels = jnp.arange(4) % 5
  init = lambda m: m.init({"params": jax.random.key(1), "dropout": jax.random.key(2)}, x,
                          labels, train=True)
  v = jax.jit(lambda: init(on_cpu))()  # jitted: an eager init compiles each op apart (~4x)
  assert jax.tree.structure(v) == jax.tree.structure(jax.eval_shape(lambda: init(plain)))

  def loss(model):
    def f(params):
      (out, _), _ = model.apply({**v, "params": params}, x, labels, train=True,
                                rngs={"dropout": jax.random.key(3)}, mutable=["batch_stats"])
      return jnp.sum(out["logits"] ** 2)
    return f
  a, b = jax.jit(jax.grad(loss(on_cpu)))(v["params"]), jax.jit(jax.grad(loss(plain)))(v["params"])
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(b))  # some are 0 in exact math
  for ga, gb in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(ga, gb, rtol=1e-3, atol=1e-4 * scale)
  grad_jaxpr = lambda m: str(jax.make_jaxpr(jax.grad(loss(m)))(v["params"]))
  assert " cond[" in grad_jaxpr(on_cpu) and " cond[" not in grad_jaxpr(plain)
