"""Decoding a rollout latent by latent, as it is generated, exactly as a whole-clip decode would.

The Wan VAE decoder is causal and keeps a cache of past frames per causal conv
(``AutoencoderKLWan._decode`` loops over latent frames with ``feat_cache``; DESIGN.md §3a). Decoding a
chunk on its own is wrong twice (its first latent is taken for an image, and every frame misses its
past), so a session keeps *its own* cache (``DecodeState``) between chunks and feeds the decoder one
latent at a time: the frames equal a whole-clip decode's, bitwise, and each latent's 4 frames exist as
soon as it is decoded (what streaming sends). diffusers has no public API for this loop, hence the
few lines below that drive ``vae.decoder`` the way ``_decode`` does.

The cache is large at real sizes (~1.8 GiB bf16 per session at 480x832), so it lives in replica memory
for active sessions only. A session that moves to another replica rebuilds it by decoding all of its
latents once (``catch_up``): exact, at a one-off cost linear in the rollout's length.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

from astra.model.vae import WanVAE, video_to_frames


@dataclass
class DecodeState:
    """One session's decoder cache and how many of its latents it has seen."""

    feat_map: list = field(default_factory=list)
    latents_seen: int = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.feat_map if isinstance(t, torch.Tensor))


@torch.no_grad()
def decode_stream(vae: WanVAE, state: DecodeState, latents: torch.Tensor) -> Iterator[torch.Tensor]:
    """latents (C, n, h, w): the session's *next* n normalised latents. Yields uint8 frames
    (f, H, W, 3) per latent (1 frame for the session's first latent, 4 after), advancing ``state``."""
    inner = vae.vae
    if state.latents_seen == 0:
        state.feat_map = [None] * inner._cached_conv_counts["decoder"]
    dtype = next(inner.parameters()).dtype
    z = latents[None].float() * vae.latents_std + vae.latents_mean  # (1, C, n, h, w)
    for i in range(z.shape[2]):
        x = inner.post_quant_conv(z[:, :, i : i + 1].to(dtype))
        out = inner.decoder(x, feat_cache=state.feat_map, feat_idx=[0], first_chunk=state.latents_seen == 0)
        if inner.config.patch_size is not None:  # Wan-2.2-style VAEs decode to patches
            out = unpatchify(out, patch_size=inner.config.patch_size)
        state.latents_seen += 1
        yield video_to_frames(out.float().clamp(-1, 1))[0]


def catch_up(vae: WanVAE, state: DecodeState, history: torch.Tensor) -> None:
    """Bring ``state`` up to the session's ``history`` (C, F, h, w) by decoding what it has not seen
    (all of it for a fresh state: after a move to another replica)."""
    for _ in decode_stream(vae, state, history[:, state.latents_seen :]):
        pass
