"""Training: optimizer, train state, the jitted step, the loop, checkpoints, sharding."""
