"""askd_jax.data."""
