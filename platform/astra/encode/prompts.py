"""The prompt stage of the encode job: each distinct prompt embedded once and stored, rows get its key.

Imports the text encoder only (no diffusers), so its actor starts fast.
"""

from __future__ import annotations

import numpy as np

from astra.data.store import LatentStore
from astra.encode.config import EncodeConfig
from astra.model.text import build_text_encoder, prompt_key


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
