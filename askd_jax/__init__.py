"""askd_jax: Attention Similarity Knowledge Distillation (A-SKD) in JAX/Flax."""

__version__ = "0.1.0"
