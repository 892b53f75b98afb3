"""askd_jax.tools."""
