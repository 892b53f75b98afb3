"""models/layers.py's conv helper (BN and PReLU: torch parity in test_parity_model.py)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from askd_jax import ops
from askd_jax.models import layers


def test_conv_layer_uses_ops_convolution_and_keeps_its_params():
  """layers.conv: askd_jax.ops' convolution, the same parameters and output as nn.Conv."""
  import flax.linen as nn
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  ours = layers.conv(8, 3, 2, dtype=jnp.float32)
  plain = nn.Conv(8, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=False)
  assert ours.conv_general_dilated is ops.conv_general_dilated
  v = ours.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, v) == jax.tree.map(jnp.shape, plain.init(jax.random.key(0), x))
  np.testing.assert_allclose(ours.apply(v, x), plain.apply(v, x), rtol=1e-6, atol=1e-6)
