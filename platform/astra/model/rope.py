"""Wan 3-D RoPE at explicit positions, with average pooling for compressed (2x / 4x) token grids.

diffusers' ``WanRotaryPosEmbed`` only reads tensor shapes: it always numbers frames 0..F-1. Astra
packs history frames at their *true* rollout indices (frame 0 = the anchor, the target starts after
the whole history), so we evaluate the same frequencies (``get_1d_rotary_pos_embed``, float64, same
t/h/w channel split) at arbitrary integer positions. A compressed token covering a (kt, kh, kw)
block of full-resolution positions gets the mean of their cos / sin (the FramePack way). Because the
t, h and w channel groups each depend on one axis only, the mean over the 3-D block is the
concatenation of per-axis means — computed here without materialising the full-resolution grid.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import get_1d_rotary_pos_embed


def axis_dims(attention_head_dim: int) -> tuple[int, int, int]:
    """Channel split of one head between the t, h and w axes (as diffusers' WanRotaryPosEmbed)."""
    h_dim = w_dim = 2 * (attention_head_dim // 6)
    return attention_head_dim - h_dim - w_dim, h_dim, w_dim


def _axis_table(dim: int, positions: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    # positions: (P,) integer -> cos, sin: (P, dim) float32, identical to diffusers' table rows.
    return get_1d_rotary_pos_embed(
        dim,
        positions.to(torch.float64),
        theta,
        use_real=True,
        repeat_interleave_real=True,
        freqs_dtype=torch.float64,
    )


def _pooled_axis(
    dim: int, positions: torch.Tensor, kernel: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: (..., S * kernel) full-resolution positions -> per-slot mean cos, sin: (..., S, dim)."""
    lead = positions.shape[:-1]
    cos, sin = _axis_table(dim, positions.reshape(-1), theta)
    return (
        cos.view(*lead, -1, kernel, dim).mean(-2),
        sin.view(*lead, -1, kernel, dim).mean(-2),
    )


def rope_at(
    attention_head_dim: int,
    frame_positions: torch.Tensor,
    base_grid_hw: tuple[int, int],
    kernel: tuple[int, int, int] = (1, 1, 1),
    theta: float = 10000.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE (cos, sin) for one token group, each of shape (B, N, 1, head_dim), N = S * gh * gw.

    frame_positions: (B, S * kt) true frame index of every full-resolution frame the group covers,
        per sample, in order (may repeat where the group was padded).
    base_grid_hw: (h, w) of the 1x token grid (latent size / patch size).
    kernel: (kt, kh, kw) compression relative to the 1x token grid: (1,1,1), (2,2,2) or (4,4,4).
        The compressed grid is ceil(h / kh) x ceil(w / kw); positions beyond the 1x grid (replicate
        padding of sizes that do not divide) reuse the last position, as the latents do.
    """
    kt, kh, kw = kernel
    base_h, base_w = base_grid_hw
    gh, gw = -(-base_h // kh), -(-base_w // kw)
    t_dim, h_dim, w_dim = axis_dims(attention_head_dim)
    device = frame_positions.device
    batch, num_frames = frame_positions.shape
    if num_frames % kt:
        raise ValueError(f"frame_positions ({num_frames}) must be a multiple of kernel t ({kt})")
    num_slots = num_frames // kt

    cos_t, sin_t = _pooled_axis(t_dim, frame_positions, kt, theta)  # (B, S, t_dim)
    rows = clamp_positions(gh * kh, base_h, device)
    cols = clamp_positions(gw * kw, base_w, device)
    cos_h, sin_h = _pooled_axis(h_dim, rows, kh, theta)  # (gh, h_dim)
    cos_w, sin_w = _pooled_axis(w_dim, cols, kw, theta)  # (gw, w_dim)

    def grid(a_t: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor) -> torch.Tensor:
        # (B, S, gh, gw, head_dim) -> (B, S*gh*gw, 1, head_dim), the token order of flatten(2).
        shape = (batch, num_slots, gh, gw, -1)
        full = torch.cat(
            [
                a_t.view(batch, num_slots, 1, 1, -1).expand(shape),
                a_h.view(1, 1, gh, 1, -1).expand(shape),
                a_w.view(1, 1, 1, gw, -1).expand(shape),
            ],
            dim=-1,
        )
        return full.reshape(batch, num_slots * gh * gw, 1, -1)

    return grid(cos_t, cos_h, cos_w), grid(sin_t, sin_h, sin_w)


def clamp_positions(n: int, limit: int, device: torch.device | None = None) -> torch.Tensor:
    """0..n-1 with indices >= limit clamped to limit-1 (positions of replicate-padded rows)."""
    return torch.arange(n, device=device).clamp(max=limit - 1)
