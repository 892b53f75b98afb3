"""askd_jax.tasks."""
