"""Flow matching for Astra training: schedule, noising, target, loss weights, history corruption.

Convention (Wan / DiffSynth): x_t = (1 - s) x0 + s eps with sigma s in [0, 1]; the model is fed
t = 1000 s and predicts the velocity v = eps - x0. Shifted schedules push sigma towards 1:
s' = shift * s / (1 + (shift - 1) * s).

Every random draw takes an explicit ``torch.Generator``: training is reproducible per seed and no
state lives on any object.
"""

from __future__ import annotations

import torch

from astra.config import DiffusionConfig

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigma / (1 + (shift - 1) * sigma)


def sampling_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """(num_steps + 1,) decreasing float64 sigmas from 1 to 0, shifted."""
    return shift_sigma(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift)


def sample_training_sigmas(
    batch: int, shift: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B,) sigmas: uniform over the shifted training schedule (as DiffSynth's random timestep id)."""
    u = torch.rand(batch, generator=generator, dtype=torch.float64)
    # DiffSynth's schedule spans sigma in (0, 1]; keep sigma off exactly 0
    return shift_sigma(u.clamp(min=1.0 / NUM_TRAIN_TIMESTEPS), shift).float()


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - s) x0 + s eps; sigma (B,) broadcast over the other dims."""
    s = sigma.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def loss_weight(sigma: torch.Tensor, kind: str, shift: float) -> torch.Tensor:
    """(B,) per-sample loss weights.

    'bell' is DiffSynth's training weight: y(t) = exp(-2 ((t - 500) / 1000)^2), minus its minimum
    over the shifted 1000-step training grid, scaled so its mean over that grid is 1 (mid-range
    timesteps count most). 'uniform': ones.
    """
    if kind == "uniform":
        return torch.ones_like(sigma)

    def bell(t: torch.Tensor) -> torch.Tensor:
        return torch.exp(-2 * ((t - NUM_TRAIN_TIMESTEPS / 2) / NUM_TRAIN_TIMESTEPS) ** 2)

    grid = shift_sigma(torch.linspace(1.0, 0.0, NUM_TRAIN_TIMESTEPS + 1)[:-1], shift) * NUM_TRAIN_TIMESTEPS
    y = bell(grid)
    low, mean = y.min(), (y - y.min()).mean()
    return ((bell(sigma.float() * NUM_TRAIN_TIMESTEPS) - low) / mean).clamp(min=0)


def bernoulli(batch: int, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) bool, True with probability p."""
    return torch.rand(batch, generator=generator) < p


def noise_as_mask_sigmas(
    batch: int, cfg: DiffusionConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B,) corruption levels: sigma = shift(u), u ~ U[noise_as_mask_range] (the reference draws a
    timestep among the first 750 of 1,000 shifted steps: sigma in [0.625, 1], median ~0.89)."""
    lo, hi = cfg.noise_as_mask_range
    u = lo + (hi - lo) * torch.rand(batch, generator=generator, dtype=torch.float64)
    return shift_sigma(u, cfg.noise_as_mask_shift).float()


def noise_as_mask(
    latents: list[torch.Tensor],
    factors: list[int],
    cfg: DiffusionConfig,
    generator: torch.Generator | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Corrupt clean history (noise-as-mask): per sample, with probability ``noise_as_mask_prob``,
    the history latents of the scales in ``noise_as_mask_scales`` become (1 - s) x + s eps, s from
    ``noise_as_mask_sigmas``; other scales stay clean.

    latents: history tensors, each (B, ...), one per FramePack group, whose compression factors are
    ``factors`` (4, 2, 1); a sample uses one s for all its corrupted groups. Returns the tensors, the
    (B,) bool mask of corrupted samples and their (B,) sigmas (0 where not corrupted).
    """
    batch = latents[0].shape[0] if latents else 0
    mask = bernoulli(batch, cfg.noise_as_mask_prob, generator)
    sigma = noise_as_mask_sigmas(batch, cfg, generator) * mask
    scales = {int(s.removesuffix("x")) for s in cfg.noise_as_mask_scales}
    out = []
    for x, factor in zip(latents, factors, strict=True):
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        out.append(add_noise(x, eps, sigma.to(x.device)) if factor in scales else x)
    return out, mask, sigma


def timestep_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    return sigma * NUM_TRAIN_TIMESTEPS
