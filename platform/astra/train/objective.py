"""The Astra training objective for one batch of chunks (pure torch; the Ray Train loop calls it).

Per sample: 5% action dropout (all actions and flags zeroed, for AFG), noise-as-mask corruption of
the clean history (p = 0.8, sigma = shift_5(U[0.25, 1]), the 1x group only — the reference's
values, all settings), a flow-matching timestep from the shifted schedule, then the weighted MSE between predicted and true velocity, plus the router's
load-balancing loss when routing is learned. Randomness comes from one explicit generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from astra.config import ActionConfig, DiffusionConfig
from astra.diffusion.flow import (
    add_noise,
    bernoulli,
    loss_weight,
    noise_as_mask,
    sample_training_sigmas,
    timestep_from_sigma,
    velocity_target,
)
from astra.model.framepack import ChunkInputs
from astra.model.transformer import AstraTransformer


@dataclass(frozen=True)
class StepStats:
    loss: torch.Tensor  # scalar, what is back-propagated
    flow_loss: torch.Tensor  # scalar, weighted velocity MSE
    router_loss: torch.Tensor  # scalar
    expert_usage: torch.Tensor  # (E,) mean gate per expert
    sigma: torch.Tensor  # (B,) target noise levels
    history_noised: torch.Tensor  # (B,) bool, noise-as-mask applied
    history_sigma: torch.Tensor  # (B,) corruption level (0 where not applied)
    actions_dropped: torch.Tensor  # (B,) bool


def training_loss(
    model: AstraTransformer,
    target_latents: torch.Tensor,
    inputs: ChunkInputs,
    diffusion: DiffusionConfig,
    actions: ActionConfig,
    generator: torch.Generator | None = None,
) -> StepStats:
    """target_latents: (B, C, T, h, w) clean latents of the chunk to predict; ``inputs`` its packed
    history, actions and prompt (clean: corruption happens here)."""
    batch, device = target_latents.shape[0], target_latents.device

    # 1. action dropout -> the model learns the null-action velocity AFG needs
    dropped = bernoulli(batch, diffusion.action_dropout_prob, generator)
    inputs = inputs.without_actions(dropped.to(device))

    # 2. noise-as-mask on the history (training only: inference sees clean history)
    noised = torch.zeros(batch, dtype=torch.bool)
    history_sigma = torch.zeros(batch)
    if inputs.history:
        corrupted, noised, history_sigma = noise_as_mask(
            [g.latents for g in inputs.history], [g.factor for g in inputs.history], diffusion, generator
        )
        inputs = inputs.with_history_latents(corrupted)

    # 3. flow matching on the target chunk
    sigma = sample_training_sigmas(batch, diffusion.shift, generator)
    noise = torch.randn(target_latents.shape, generator=generator, dtype=target_latents.dtype).to(device)
    x_t = add_noise(target_latents, noise, sigma.to(device))
    pred, aux = model(x_t, timestep_from_sigma(sigma).to(device), inputs)
    err = (pred.float() - velocity_target(target_latents, noise).float()).pow(2).flatten(1).mean(1)  # (B,)
    flow_loss = (err * loss_weight(sigma, diffusion.loss_weighting, diffusion.shift).to(device)).mean()
    router_loss = aux["router_loss"]
    loss = flow_loss + (actions.router_aux_weight * router_loss if actions.routing == "learned" else 0.0)
    return StepStats(
        loss=loss,
        flow_loss=flow_loss.detach(),
        router_loss=router_loss.detach(),
        expert_usage=aux["expert_usage"],
        sigma=sigma,
        history_noised=noised,
        history_sigma=history_sigma,
        actions_dropped=dropped,
    )


@torch.no_grad()
def fixed_sigma_loss(
    model: AstraTransformer,
    target_latents: torch.Tensor,
    inputs: ChunkInputs,
    sigmas: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9),
    seed: int = 0,
) -> torch.Tensor:
    """Validation loss: plain velocity MSE at fixed noise levels with fixed noise, clean history and
    real actions (no corruption, no dropout), so runs and steps compare. Returns (len(sigmas),)."""
    generator = torch.Generator().manual_seed(seed)
    device = target_latents.device
    noise = torch.randn(target_latents.shape, generator=generator, dtype=target_latents.dtype).to(device)
    out = []
    for s in sigmas:
        sigma = torch.full((target_latents.shape[0],), s)
        x_t = add_noise(target_latents, noise, sigma.to(device))
        pred, _ = model(x_t, timestep_from_sigma(sigma).to(device), inputs)
        out.append((pred.float() - velocity_target(target_latents, noise).float()).pow(2).mean())
    return torch.stack(out)
