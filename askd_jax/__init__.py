"""askd_jax: Attention Similarity Knowledge Distillation (A-SKD) in JAX/Flax."""

__version__ = "0.1.0"


def load(path, batch_size: int = 64, evaluation=None):
  """A trained face model to embed and compare faces; see askd_jax.api (imported on use)."""
  from askd_jax.api import load as _load
  return _load(path, batch_size=batch_size, evaluation=evaluation)
