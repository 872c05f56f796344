"""The accelerator stage of the encode job: uint8 frames -> normalised VAE latents.

The encode job's stages, one module each, in pipeline order:
    decode_row      CPU task   (astra.encode.decode)  record -> uint8 frames + action rows, or an error
    VAEEncoder      actor      (here)                 frames -> latents, one VAE per actor / accelerator
    PromptEmbedder  actor      (astra.encode.prompts) prompt -> prompt_key, new embeddings to the store
    ShardWriter     actor      (astra.encode.writer)  rows -> one latent + one quarantine shard

A bad clip never raises: its row carries ``error`` (the quarantine reason) and ``stage`` and flows
through the later stages untouched, so the writer quarantines it in the same pass. Frames travel as
raw uint8 bytes (cheap to move, no float copies) until the accelerator stage.
"""

from __future__ import annotations

import numpy as np
import torch

from astra.data.store import tensor_to_bytes
from astra.encode.config import EncodeConfig
from astra.model.vae import WanVAE


class VAEEncoder:
    """Actor: frames -> normalised latents (bytes). Loads the VAE once, on the actor's device."""

    def __init__(self, config: EncodeConfig):
        self.config = config
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.vae = (
            WanVAE.from_config(config.vae, dtype=getattr(torch, config.compute.vae_dtype))
            .to(self.device)
            .eval()
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        v = self.config.video
        ok = [i for i, e in enumerate(batch["error"]) if not e]
        latents = np.array([b""] * len(batch["error"]), dtype=object)
        shapes = [[0, 0, 0, 0] for _ in batch["error"]]
        if ok:
            frames = np.stack(
                [
                    np.frombuffer(batch["frames"][i], np.uint8).reshape(v.num_frames, v.height, v.width, 3)
                    for i in ok
                ]
            )
            video = (
                torch.from_numpy(frames).to(self.device).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)
            )
            z = self.vae.encode(video).cpu()  # (B, C, 1+k, h, w) float32
            for j, i in enumerate(ok):
                latents[i], shapes[i], _ = tensor_to_bytes(z[j])
        out = {k: batch[k] for k in batch if k != "frames"}
        out["latents"] = latents
        out["latents_shape"] = np.array(shapes, dtype=np.int32)
        return out
