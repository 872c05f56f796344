"""The sink of the encode job: a batch of finished rows -> one latent shard + one quarantine shard.

Imports only the store (no diffusers / transformers), so its actor starts fast.
"""

from __future__ import annotations

import numpy as np
import torch

from astra.data.store import LatentRecord, LatentStore
from astra.encode.config import EncodeConfig


class ShardWriter:
    """Actor: write the batch's good rows as one latent shard and its bad rows as one quarantine shard."""

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
        }
