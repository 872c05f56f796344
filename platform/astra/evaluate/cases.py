"""Held-out evaluation cases: a synthetic world, its start frame, commanded actions and the
ground-truth futures of the commanded and of K distractor action sequences from the same start.

Everything derives from (config.seed, modality, index): the world's seed, the commanded sequence
and the distractors. Because rendering is pure and the state complete, the ground truth of any
action sequence is re-rendered exactly (``astra.data.synthetic.rollout``). Action rows per latent
frame come from the rendered poses through ``latent_actions`` — the very function the encode job
applies to a clip's poses, so the model sees rows of the same kind it was trained on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from astra.data.actions import latent_actions
from astra.data.synthetic import branched_actions, initial_state, make_world, prompt_of, rollout


@dataclass(frozen=True)
class Case:
    case_id: str
    modality: str
    world_seed: int
    prompt: str
    rows: np.ndarray  # (1 + L, raw_dim) commanded action rows per latent frame (row 0: rest)
    truths: list[np.ndarray]  # [commanded, distractor 1..K]: (1 + 4L, H, W, 3) uint8 each
    distractor_rows: tuple[np.ndarray, ...] = ()  # [distractor 1..K]: (1 + L, raw_dim) each
    history: int = 1  # latent frames of ground truth the rollouts start from (shared by every truth)

    @property
    def sequences(self) -> list[np.ndarray]:
        """The action rows of every truth, in the order of ``truths``."""
        return [self.rows, *self.distractor_rows]

    @property
    def history_frames(self) -> int:
        return history_frames(self.history)


def history_frames(history: int) -> int:
    """Video frames of a shared start of ``history`` latents: the start frame + 4 per further latent."""
    return 1 + 4 * (history - 1)


def world_seed(seed: int, modality: str, index: int) -> int:
    """The seed of held-out world ``index`` of ``modality`` (independent of the case count)."""
    digest = hashlib.sha256(f"eval:{seed}:{modality}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def make_case(
    modality: str,
    index: int,
    seed: int,
    latents: int,
    distractors: int,
    size: tuple[int, int],
    fps: float,
    history: int = 1,
) -> Case:
    """Case ``index``: ``latents`` latent frames after the start (4 video frames each).

    ``history`` = H > 1: the commanded and distractor sequences share their first 4 (H - 1) actions
    (``branched_actions``), so all truths show the same first ``1 + 4 (H - 1)`` frames — H latents
    of ground-truth history, moving under known actions — and branch after them; ``latents``
    counts from the start frame as always (the history's H - 1 latents included)."""
    if not 1 <= history <= latents:
        raise ValueError(f"history: need 1 <= history latents <= {latents} (the case's), got {history}")
    wseed = world_seed(seed, modality, index)
    world = make_world(modality, wseed, dt=1.0 / fps)
    start = initial_state(world)
    frames = 1 + 4 * latents
    truths, rows = [], []
    for k in range(distractors + 1):
        # the trunk's seed (wseed * 37) is none of the sequences' (wseed * 31 + k)
        actions = branched_actions(world, frames, wseed * 31 + k, wseed * 37, 4 * (history - 1))
        clip = rollout(world, start, actions, size)
        truths.append(clip.frames)
        rows.append(latent_actions(modality, clip.poses).astype(np.float32))
    return Case(
        f"{modality}-{index:04d}-w{wseed}",
        modality,
        wseed,
        prompt_of(world),
        rows[0],
        truths,
        tuple(rows[1:]),
        history,
    )


def seeds_in_store(storage) -> set[int]:
    """World seeds of the synthetic clips in a latent store (``StorageConfig``; the synthetic clip ids
    end in ``-w<seed>``, windows add ``#k``)."""
    from astra.data.catalog import Catalog
    from astra.data.store import LatentStore

    seeds = set()
    for cid in Catalog(LatentStore(storage)).refresh().rows().column("clip_id").to_pylist():
        tail = cid.split("#", 1)[0].rsplit("-w", 1)
        if len(tail) == 2 and tail[1].isdigit():
            seeds.add(int(tail[1]))
    return seeds
