"""The sink of the encode job: a batch of finished rows -> one latent shard + one quarantine shard.

Imports only the store (no diffusers / transformers), so its actor starts fast. Latents arrive as
bytes in the store's own layout and are written as they are (no tensor round trip).
"""

from __future__ import annotations

import numpy as np

from astra.data.store import LatentStore
from astra.encode.config import EncodeConfig


class ShardWriter:
    """Actor: write the batch's good rows as one latent shard and its bad rows as one quarantine shard."""

    def __init__(self, config: EncodeConfig):
        self.config = config
        self.store = LatentStore(config.store)
        self.encode_hash = config.encode_hash()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        v = self.config.video
        rows, bad = [], []
        for i, err in enumerate(batch["error"]):
            if err:
                bad.append(
                    {
                        "clip_id": str(batch["source_clip_id"][i]),
                        "source_uri": str(batch["source_uri"][i]),
                        "stage": str(batch["stage"][i]),
                        "reason": str(err),
                        "encode_hash": self.encode_hash,
                    }
                )
                continue
            modality = str(batch["modality"][i])
            raw_dim = self.config.actions.modality(modality).raw_dim
            rows.append(
                {
                    "clip_id": str(batch["clip_id"][i]),
                    "source_clip_id": str(batch["source_clip_id"][i]),
                    "window": int(batch["window"][i]),
                    "last_window": bool(batch["last_window"][i]),
                    "start_seconds": float(batch["start_seconds"][i]),
                    "dataset": str(batch["dataset"][i]),
                    "modality": modality,
                    "latents": batch["latents"][i],
                    "latents_shape": [int(s) for s in batch["latents_shape"][i]],
                    "latents_dtype": self.config.latent_dtype,
                    "actions": batch["actions"][i],
                    "actions_shape": [int(batch["num_action_rows"][i]), raw_dim],
                    "prompt_key": str(batch["prompt_key"][i]),
                    "source_uri": str(batch["source_uri"][i]),
                    "vae_id": self.config.vae.vae_id,
                    "encode_hash": self.encode_hash,
                    "num_frames": int(batch["num_frames"][i]),
                    "fps": float(batch["fps"][i]),
                    "height": v.height,
                    "width": v.width,
                }
            )
        self.store.write_latent_rows(rows)
        self.store.quarantine(bad)
        keep = ("clip_id", "source_clip_id", "window", "last_window", "stage", "video_seconds")
        out = {k: batch[k] for k in keep}
        out["status"] = np.array(["quarantined" if e else "encoded" for e in batch["error"]], dtype=object)
        out["reason"] = batch["error"]
        out["action_free"] = np.asarray(batch["num_action_rows"]) == 0
        return out
