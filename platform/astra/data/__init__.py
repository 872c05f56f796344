"""Data plane: action maths, synthetic worlds, video decode, latent store (data-plane issue)."""
