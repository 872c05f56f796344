"""Training samples: a segment of a stored clip -> packed history + target, bucketed into batches.

A sample is drawn from one clip (``LatentRecord``, stored whole or as a window by the encode job):
a history length from the configured distribution (the reference: 40% one latent, 50% uniform over
2..max, 10% max), a start point inside the clip, then ``target_latents`` latents to predict. The
segment's first latent is its anchor, so its action row is the *rest* row, as a rollout session's
start frame's is. History is packed by the very ``plan_chunk`` the chunk engine uses (the anchor's
RoPE place included), so training sees exactly the layouts inference produces.

Batches need equal packed shapes: ``Bucketer`` groups samples by their FramePack group sizes (any
two samples whose windows are full share one) so batch > 1 works with mixed history lengths. An
action-free clip trains with the null action (actions, flags and presence zero), like dropout.
Corruption (noise-as-mask, action dropout) is not done here: it belongs to ``training_loss``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from astra.data.actions import rest_rows
from astra.data.store import LatentRecord
from astra.model.framepack import ChunkInputs, concat_inputs, pack_chunk, plan_chunk
from astra.model.text import pad_context
from astra.train.config import HistoryConfig, TrainConfig


@dataclass(frozen=True)
class Sample:
    clip_id: str
    history: torch.Tensor  # (C, H, h, w) clean latents, H >= 1
    target: torch.Tensor  # (C, T, h, w)
    actions: torch.Tensor  # (H + T, raw_dim) raw rows, row 0 = rest
    has_actions: bool  # False: an action-free clip (null actions)
    modality: str
    prompt_key: str

    @property
    def num_history(self) -> int:
        return self.history.shape[1]

    def shape_key(self, config: TrainConfig) -> tuple:
        """Samples with equal keys pack to tensors of equal shapes: they can share a batch."""
        plan = plan_chunk(self.num_history, config.astra.model.framepack, self.target.shape[1])
        groups = tuple((g.factor, len(g.frames)) for g in plan.history)
        return (groups, tuple(self.target.shape))


def history_length(max_latents: int, cfg: HistoryConfig, rng: np.random.Generator) -> int:
    """One draw of the history length in 1..max_latents."""
    u = rng.random()
    if max_latents <= 1 or u < cfg.p_single:
        return 1
    if u < cfg.p_single + cfg.p_uniform:
        return int(rng.integers(2, max_latents + 1))
    return max_latents


def draw_sample(record: LatentRecord, config: TrainConfig, rng: np.random.Generator) -> Sample | None:
    """A random segment of ``record``; None when the clip is shorter than one history latent plus the
    target. Pretraining (``stage=pretrain``) draws segments of the target alone: no history."""
    num, target = record.latents.shape[1], config.target_latents
    if num < target + config.history_latents:
        return None
    num_history = 0
    if config.history_latents:
        num_history = history_length(min(config.max_history, num - target), config.data.history, rng)
    start = int(rng.integers(0, num - target - num_history + 1))
    stop = start + num_history + target
    latents = record.latents[:, start:stop].float()
    raw_dim = config.astra.model.actions.modality(record.modality).raw_dim
    actions = torch.from_numpy(rest_rows(record.modality, raw_dim, num_history + target))
    has_actions = record.has_actions and num_history > 0  # pretraining: the null action throughout
    if has_actions:
        actions[1:] = record.actions[start + 1 : stop].float()  # row 0: the segment's start, at rest
    return Sample(
        clip_id=record.clip_id,
        history=latents[:, :num_history],
        target=latents[:, num_history:],
        actions=actions,
        has_actions=has_actions,
        modality=record.modality,
        prompt_key=record.prompt_key,
    )


def collate(
    samples: list[Sample], prompts: dict[str, torch.Tensor], config: TrainConfig
) -> tuple[torch.Tensor, ChunkInputs]:
    """Samples of one bucket -> (target latents (B, C, T, h, w), packed ChunkInputs)."""
    mcfg = config.astra.model
    width = mcfg.actions.max_raw_dim
    parts = []
    for s in samples:
        plan = plan_chunk(s.num_history, mcfg.framepack, s.target.shape[1])
        rows = torch.nn.functional.pad(s.actions, (0, width - s.actions.shape[1]))  # (H + T, A)
        parts.append(
            pack_chunk(
                plan,
                s.history[None],
                rows[None],
                pad_context([prompts[s.prompt_key]], mcfg.context_length),
                torch.tensor([mcfg.actions.modality_id(s.modality)]),
            )
        )
    inputs = concat_inputs(parts)
    action_free = torch.tensor([not s.has_actions for s in samples])
    if action_free.any():
        inputs = inputs.without_actions(action_free)
    return torch.stack([s.target for s in samples]), inputs


class Bucketer:
    """Groups samples by packed shape; a bucket that reaches ``batch_size`` is handed out."""

    def __init__(self, batch_size: int, config: TrainConfig):
        self.batch_size, self.config = batch_size, config
        self.buckets: dict[tuple, list[Sample]] = defaultdict(list)

    def add(self, sample: Sample) -> list[Sample] | None:
        key = sample.shape_key(self.config)
        bucket = self.buckets[key]
        bucket.append(sample)
        if len(bucket) < self.batch_size:
            return None
        del self.buckets[key]
        return bucket

    def __len__(self) -> int:
        return sum(len(b) for b in self.buckets.values())
