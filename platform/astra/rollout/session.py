"""A rollout session: everything one interactive rollout needs to produce its next chunk.

The session is plain data (no model, no sampler): history latents, one action row per latent
frame, the prompt embedding, the modality, the step count (its version) and the RNG state. It
serialises to bytes — tensors as safetensors, scalars as JSON in the safetensors header — so
serving can persist it after every chunk and any replica can resume it. Restoring and continuing
gives bitwise the same chunks as continuing the original.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch
from safetensors.torch import load, save

from astra.data.actions import rest_rows

FORMAT = "astra-session/1"


@dataclass(frozen=True)
class RolloutSession:
    session_id: str
    modality: str
    history: torch.Tensor  # (C, F, h, w) float32 normalised latents, frame 0 = the start image
    actions: torch.Tensor  # (F, raw_dim) float32 action row of every history latent frame
    prompt: torch.Tensor  # (L, text_dim) prompt embedding
    seed: int
    rng_state: torch.Tensor  # uint8, torch.Generator state after the last chunk
    step: int = 0  # chunks generated so far: the session's version
    null_prompt: torch.Tensor | None = None  # (L, text_dim), only needed for text CFG

    @classmethod
    def start(
        cls,
        session_id: str,
        modality: str,
        start_latents: torch.Tensor,
        prompt: torch.Tensor,
        raw_dim: int,
        seed: int,
        null_prompt: torch.Tensor | None = None,
        start_actions: torch.Tensor | None = None,
    ) -> RolloutSession:
        """A new session from the start image's latents (C, 1, h, w) (or (C, 0, h, w): no image), or
        from a start clip's latents (C, F, h, w) with their action rows ``start_actions`` (F, raw_dim).
        The start frame has no predecessor: its action row is the modality's rest action (no motion),
        as the encode job stores it (zeros for a modality without action maths); that is also the
        default of every row when ``start_actions`` is not given."""
        if start_latents.ndim != 4:
            raise ValueError(f"start_latents: expected (C, F, h, w), got shape {tuple(start_latents.shape)}")
        frames = start_latents.shape[1]
        if start_actions is None:
            start_actions = torch.from_numpy(rest_rows(modality, raw_dim, frames))
        elif tuple(start_actions.shape) != (frames, raw_dim):
            raise ValueError(
                f"start_actions: expected ({frames}, {raw_dim}) rows (one per start latent), "
                f"got shape {tuple(start_actions.shape)}"
            )
        generator = torch.Generator().manual_seed(seed)
        return cls(
            session_id=session_id,
            modality=modality,
            history=start_latents.float().contiguous(),
            actions=start_actions.float().contiguous(),
            prompt=prompt.contiguous(),
            seed=seed,
            rng_state=generator.get_state(),
            step=0,
            null_prompt=None if null_prompt is None else null_prompt.contiguous(),
        )

    @property
    def num_frames(self) -> int:
        return self.history.shape[1]

    def generator(self) -> torch.Generator:
        g = torch.Generator()
        g.set_state(self.rng_state)
        return g

    def advanced(
        self, chunk: torch.Tensor, actions: torch.Tensor, generator: torch.Generator
    ) -> RolloutSession:
        """The next version: chunk (C, T, h, w) and its actions (T, raw_dim) appended."""
        return dataclasses.replace(
            self,
            history=torch.cat([self.history, chunk.to(self.history)], dim=1),
            actions=torch.cat([self.actions, actions.to(self.actions)], dim=0),
            rng_state=generator.get_state(),
            step=self.step + 1,
        )

    # ------------------------------------------------------------------ persistence

    def to_bytes(self) -> bytes:
        tensors = {
            "history": self.history.contiguous(),
            "actions": self.actions.contiguous(),
            "prompt": self.prompt.contiguous(),
            "rng_state": self.rng_state.contiguous(),
        }
        if self.null_prompt is not None:
            tensors["null_prompt"] = self.null_prompt.contiguous()
        meta = {"format": FORMAT, "session_id": self.session_id, "modality": self.modality}
        meta |= {"seed": self.seed, "step": self.step}
        return save(tensors, metadata={"session": json.dumps(meta)})

    @classmethod
    def from_bytes(cls, data: bytes) -> RolloutSession:
        try:
            tensors = load(data)
            meta = json.loads(_metadata(data)["session"])
        except Exception as err:  # safetensors / json raise their own error types
            raise ValueError(f"session: not a serialised rollout session ({err})") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"session: unsupported format {meta.get('format')!r}, expected {FORMAT}")
        return cls(
            session_id=meta["session_id"],
            modality=meta["modality"],
            history=tensors["history"],
            actions=tensors["actions"],
            prompt=tensors["prompt"],
            seed=int(meta["seed"]),
            rng_state=tensors["rng_state"],
            step=int(meta["step"]),
            null_prompt=tensors.get("null_prompt"),
        )


def _metadata(data: bytes) -> dict[str, str]:
    # safetensors' documented layout: 8-byte little-endian header length, then a JSON header whose
    # "__metadata__" holds our strings. safetensors only exposes metadata for files (safe_open), not
    # for in-memory bytes, hence these two lines.
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]).get("__metadata__", {})
