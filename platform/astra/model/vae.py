"""The Wan VAE (diffusers ``AutoencoderKLWan``) as Astra uses it: frames <-> *normalised* latents.

Wan is causal in time: 1 + 4k frames -> 1 + k latent frames, 8x smaller spatially; encoding a
prefix of a clip gives the prefix of its latents. diffusers pipelines normalise latents themselves
with ``(z - latents_mean) / latents_std``; here that normalisation is part of the wrapper, so every
latent the platform stores, trains on or rolls out is in the model's normalised space. Encoding
uses the posterior mode (deterministic).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from torch import nn

from astra.config import ConfigError, VAEConfig


class WanVAE(nn.Module):
    def __init__(self, vae: AutoencoderKLWan):
        super().__init__()
        self.vae = vae
        z = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, z, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, z, 1, 1, 1)
        self.register_buffer("latents_mean", mean, persistent=False)
        self.register_buffer("latents_std", std, persistent=False)

    @classmethod
    def from_config(cls, cfg: VAEConfig, dtype: torch.dtype | None = None) -> WanVAE:
        """Load ``cfg.pretrained_path`` (a diffusers folder) or build a random VAE from the fields."""
        if cfg.pretrained_path is not None:
            path = Path(cfg.pretrained_path)
            folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
            if not (folder / "config.json").is_file():
                raise ConfigError(f"vae.pretrained_path: no diffusers AutoencoderKLWan folder at {path}")
            return cls(AutoencoderKLWan.from_pretrained(folder, torch_dtype=dtype, local_files_only=True))
        stats = {}
        if cfg.z_dim != 16:
            # diffusers' defaults are Wan-2.1's 16-channel statistics; other widths get identity ones
            stats = {"latents_mean": [0.0] * cfg.z_dim, "latents_std": [1.0] * cfg.z_dim}
        with torch.random.fork_rng(devices=[]):  # a seeded VAE without touching the caller's RNG
            torch.manual_seed(cfg.seed)
            vae = AutoencoderKLWan(
                base_dim=cfg.base_dim,
                z_dim=cfg.z_dim,
                dim_mult=list(cfg.dim_mult),
                temperal_downsample=list(cfg.temporal_levels),  # (sic: diffusers' spelling)
                scale_factor_spatial=cfg.spatial_factor,
                num_res_blocks=cfg.num_res_blocks,
                **stats,
            )
        return cls(vae if dtype in (None, torch.float32) else vae.to(dtype))

    @property
    def temporal_factor(self) -> int:
        return self.vae.config.scale_factor_temporal

    @property
    def spatial_factor(self) -> int:
        return self.vae.config.scale_factor_spatial

    def latent_frames(self, num_frames: int) -> int:
        """1 + 4k video frames -> 1 + k latent frames."""
        if (num_frames - 1) % self.temporal_factor:
            raise ValueError(f"num_frames must be 1 + {self.temporal_factor}k, got {num_frames}")
        return 1 + (num_frames - 1) // self.temporal_factor

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, 3, 1+4k, H, W) in [-1, 1] -> normalised latents (B, z, 1+k, H/s, W/s), float32
        (s = ``spatial_factor``: 8 for Wan's VAE, 4 for the demo's)."""
        dtype = next(self.vae.parameters()).dtype
        z = self.vae.encode(video.to(dtype)).latent_dist.mode().float()
        return (z - self.latents_mean) / self.latents_std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """normalised latents (B, z, 1+k, h, w) -> video (B, 3, 1+4k, s*h, s*w) in [-1, 1], float32."""
        dtype = next(self.vae.parameters()).dtype
        z = latents.float() * self.latents_std + self.latents_mean
        return self.vae.decode(z.to(dtype)).sample.float().clamp(-1, 1)


def frames_to_video(frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames (B, F, H, W, 3) -> float video (B, 3, F, H, W) in [-1, 1]."""
    return frames.permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)


def video_to_frames(video: torch.Tensor) -> torch.Tensor:
    """float video (B, 3, F, H, W) in [-1, 1] -> uint8 frames (B, F, H, W, 3)."""
    return video.clamp(-1, 1).add(1.0).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)
