"""The encode pipeline's accelerator and sink stages, as callable classes Ray Data runs as actors.

    decode_row      CPU task   (astra.encode.decode) record -> uint8 frames + action rows, or an error
    VAEEncoder      actor      frames -> normalised latents (one VAE per actor, on its accelerator)
    PromptEmbedder  actor      prompt -> prompt_key; embeddings of new prompts written to the store
    ShardWriter     task       rows -> one latent shard + one quarantine shard; returns a summary

A bad clip never raises: its row carries ``error`` (the quarantine reason) and ``stage`` and flows
through the later stages untouched, so the writer quarantines it in the same pass. Frames travel as
raw uint8 bytes (cheap to move, no float copies) until the accelerator stage.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from astra.data.store import LatentRecord, LatentStore, tensor_to_bytes
from astra.encode.config import EncodeConfig
from astra.model.text import build_text_encoder, prompt_key
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


class PromptEmbedder:
    """Actor: prompt -> prompt_key; embeds each distinct prompt once and writes it to the store."""

    def __init__(self, config: EncodeConfig):
        self.store = LatentStore(config.store)
        self.encoder = build_text_encoder(config.text_encoder)
        self.known = self.store.prompt_keys()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = [prompt_key(str(p), self.encoder.encoder_id) for p in batch["prompt"]]
        new = {}
        for key, prompt, err in zip(keys, batch["prompt"], batch["error"], strict=True):
            if not err and key not in self.known and key not in new:
                new[key] = str(prompt)
        if new:
            embeddings = self.encoder.encode(list(new.values()))
            self.store.write_prompts(
                [
                    (k, p, self.encoder.encoder_id, e)
                    for (k, p), e in zip(new.items(), embeddings, strict=True)
                ]
            )
            self.known |= set(new)
        return {**batch, "prompt_key": np.array(keys, dtype=object)}


class ShardWriter:
    """Task: write the batch's good rows as one latent shard and its bad rows as one quarantine shard."""

    def __init__(self, config: EncodeConfig):
        self.config = config
        self.store = LatentStore(config.store)
        self.encode_hash = config.encode_hash()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        v = self.config.video
        records, bad = [], []
        for i, err in enumerate(batch["error"]):
            if err:
                bad.append(
                    {
                        "clip_id": str(batch["clip_id"][i]),
                        "source_uri": str(batch["source_uri"][i]),
                        "stage": str(batch["stage"][i]),
                        "reason": str(err),
                        "encode_hash": self.encode_hash,
                    }
                )
                continue
            modality = str(batch["modality"][i])
            raw_dim = self.config.actions.modality(modality).raw_dim
            actions = np.frombuffer(batch["actions"][i], np.float32).reshape(-1, raw_dim)
            shape = [int(s) for s in batch["latents_shape"][i]]
            latents = torch.from_numpy(np.frombuffer(batch["latents"][i], np.float32).reshape(shape).copy())
            records.append(
                LatentRecord(
                    clip_id=str(batch["clip_id"][i]),
                    dataset=str(batch["dataset"][i]),
                    modality=modality,
                    latents=latents,
                    actions=torch.from_numpy(actions.copy()),
                    prompt_key=str(batch["prompt_key"][i]),
                    source_uri=str(batch["source_uri"][i]),
                    vae_id=self.config.vae.vae_id,
                    encode_hash=self.encode_hash,
                    num_frames=v.num_frames,
                    fps=float(batch["fps"][i]),
                    height=v.height,
                    width=v.width,
                )
            )
        self.store.write_latents(records)
        self.store.quarantine(bad)
        return {
            "clip_id": batch["clip_id"],
            "status": np.array(["quarantined" if e else "encoded" for e in batch["error"]], dtype=object),
            "reason": batch["error"],
            "video_seconds": batch["video_seconds"],
            "written_at": np.full(len(batch["error"]), time.time()),
        }
