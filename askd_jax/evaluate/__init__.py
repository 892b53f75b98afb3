"""askd_jax.evaluate."""
