"""The accelerator stage of the encode job: uint8 frames -> normalised VAE latents.

The encode job's stages, one module each, in pipeline order:
    decode_windows_of  CPU task  (astra.encode.decode)  record -> windows of uint8 frames + action rows
    VAEEncoder         actor     (here)                 frames -> latents, one VAE per actor / accelerator
    PromptEmbedder     actor     (astra.encode.prompts) prompt -> prompt_key, new embeddings to the store
    ShardWriter        actor     (astra.encode.writer)  rows -> one latent + one quarantine shard

A bad clip never raises: its row carries ``error`` (the quarantine reason) and ``stage`` and flows
through the later stages untouched, so the writer quarantines it in the same pass. Frames travel as
raw uint8 bytes (cheap to move, no float copies) until the accelerator stage.
"""

from __future__ import annotations

import numpy as np
import torch

from astra.data.store import tensor_to_bytes
from astra.encode.config import EncodeConfig


class VAEEncoder:
    """Actor: frames -> normalised latents (bytes). Loads the VAE once, on the actor's device."""

    def __init__(self, config: EncodeConfig, tracker=None):
        # imported here, in the actor: the job's driver never pays for importing diffusers (~6 s)
        from astra.model.vae import WanVAE, frames_to_video

        self.frames_to_video = frames_to_video
        self.config = config
        self.tracker = tracker
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.vae = (
            WanVAE.from_config(config.vae, dtype=getattr(torch, config.compute.vae_dtype))
            .to(self.device)
            .eval()
        )
        self.out_dtype = getattr(torch, config.latent_dtype)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        v = self.config.video
        n = len(batch["error"])
        latents = np.array([b""] * n, dtype=object)
        shapes = [[0, 0, 0, 0] for _ in range(n)]
        key = ",".join(map(str, batch["clip_id"][:2]))
        if self.tracker is not None:
            self.tracker.begin.remote("vae", key, f"{n} windows")
        # windows of equal length encode as one batch (a clip's final window may be shorter)
        by_length: dict[int, list[int]] = {}
        for i, (err, frames) in enumerate(zip(batch["error"], batch["num_frames"], strict=True)):
            if not err:
                by_length.setdefault(int(frames), []).append(i)
        for length, idx in by_length.items():
            frames = np.stack(
                [
                    np.frombuffer(batch["frames"][i], np.uint8).reshape(length, v.height, v.width, 3)
                    for i in idx
                ]
            )
            video = self.frames_to_video(torch.from_numpy(frames).to(self.device))
            z = self.vae.encode(video).to("cpu", self.out_dtype)  # (B, C, 1 + k, h, w)
            for j, i in enumerate(idx):
                latents[i], shapes[i], _ = tensor_to_bytes(z[j])
        if self.tracker is not None:
            self.tracker.end.remote("vae", key)
        out = {k: batch[k] for k in batch if k != "frames"}
        out["latents"] = latents
        out["latents_shape"] = np.array(shapes, dtype=np.int32)
        return out
