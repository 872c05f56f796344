"""Flow matching (training) and the pure chunk sampler (inference)."""
