"""Training: run settings, distributed set-up and wrapping, EMA, checkpoints, logging."""
