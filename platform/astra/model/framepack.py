"""FramePack history: which history frames go into which compressed token group, and their embedders.

A chunk sees its history packed at three scales, in token order ``[4x | 2x | 1x | target]``:
the newest ``recent_frames`` and the anchor (frame 0, the start image) at 1x, the next
``frames_2x`` older frames at 2x (kernel 2x4x4 in latents), the next ``frames_4x`` at 4x (4x8x8).
Older frames leave the window. Once the window is full the packed history costs a constant number
of tokens however long the rollout is (about 3.9K at 480x832), so a chunk costs O(1).

Everything here is index bookkeeping done once, up front, by a pure function (``plan_chunk``):
every token group records the *true* latent-frame index of every frame it covers, and the
latents, the action rows, the flags and the RoPE positions of the group are all gathered with
those same indices. That is what keeps actions aligned for any rollout length (the reference code
reads the wrong action rows after 20 latents and shifts the most recent frame by one).

A compressed group needs a whole number of temporal blocks (2 or 4 frames). While the history is
still short, a partial block is completed by repeating its oldest frame (edge padding): the slot
then shows, sits at and acts like that frame.

RoPE positions are the true indices with one exception: the anchor. At its true index 0 it would sit
~360 latents before the target at chunk 44 — a distance training never produces. It is placed just
before the oldest frame of the packed window instead (as FramePack-F1 does): while the window still
reaches frame 1 that *is* index 0, afterwards it moves with the window, so every RoPE distance a chunk
sees is bounded by the window length whatever the rollout length. Training builds its samples with the
same ``plan_chunk``, so the anchor sits where training put it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from astra.config import FramePackConfig

#: compression factor of each history scale relative to the 1x token grid
FACTORS = {"4x": 4, "2x": 2, "1x": 1}


# ----------------------------------------------------------------------------- the plan (pure)


@dataclass(frozen=True)
class GroupPlan:
    """One token group: its scale and the latent-frame index of every full-resolution frame it covers."""

    scale: str  # "4x" | "2x" | "1x" | "target"
    frames: tuple[int, ...]  # latent frames gathered (latents, action rows)
    positions: tuple[int, ...] | None = None  # their RoPE positions; None: the frames themselves

    @property
    def rope_positions(self) -> tuple[int, ...]:
        return self.frames if self.positions is None else self.positions

    @property
    def factor(self) -> int:
        return FACTORS.get(self.scale, 1)

    @property
    def num_slots(self) -> int:
        """Token planes (compressed frames) of the group."""
        return len(self.frames) // self.factor

    def tokens_per_slot(self, latent_hw: tuple[int, int], patch_hw: tuple[int, int]) -> int:
        gh = -(-latent_hw[0] // (patch_hw[0] * self.factor))
        gw = -(-latent_hw[1] // (patch_hw[1] * self.factor))
        return gh * gw

    def num_tokens(self, latent_hw: tuple[int, int], patch_hw: tuple[int, int]) -> int:
        return self.num_slots * self.tokens_per_slot(latent_hw, patch_hw)


@dataclass(frozen=True)
class ChunkPlan:
    """Token groups of one chunk: history groups in token order, then the target."""

    num_history: int
    history: tuple[GroupPlan, ...]
    target: GroupPlan

    @property
    def groups(self) -> tuple[GroupPlan, ...]:
        return (*self.history, self.target)

    def history_tokens(self, latent_hw: tuple[int, int], patch_hw: tuple[int, int] = (2, 2)) -> int:
        return sum(g.num_tokens(latent_hw, patch_hw) for g in self.history)

    def target_tokens(self, latent_hw: tuple[int, int], patch_hw: tuple[int, int] = (2, 2)) -> int:
        return self.target.num_tokens(latent_hw, patch_hw)


def _pad_oldest(frames: list[int], multiple: int) -> list[int]:
    # Complete a partial temporal block by repeating the oldest frame at the front.
    short = (-len(frames)) % multiple
    return [frames[0]] * short + frames if frames else frames


def plan_chunk(num_history: int, layout: FramePackConfig, num_target: int | None = None) -> ChunkPlan:
    """Pack latent frames ``0..num_history-1`` as history for target frames ``num_history..+T-1``.

    Newest frames go to the finest scale: ``recent_frames`` at 1x, then ``frames_2x`` at 2x, then
    ``frames_4x`` at 4x; frame 0 stays at 1x as the anchor when ``layout.keep_anchor``, at the RoPE
    position just before the oldest other packed frame (see the module docstring).
    """
    if num_history < 0:
        raise ValueError(f"num_history must be >= 0, got {num_history}")
    num_target = layout.target_frames if num_target is None else num_target
    rest = list(range(num_history))
    anchor: list[int] = []
    if layout.keep_anchor and rest:
        anchor, rest = rest[:1], rest[1:]

    def take_newest(n: int) -> list[int]:
        nonlocal rest
        cut = max(len(rest) - n, 0)
        taken, rest = rest[cut:], rest[:cut]
        return taken

    recent = take_newest(layout.recent_frames)
    two = _pad_oldest(take_newest(layout.frames_2x), 2)
    four = _pad_oldest(take_newest(layout.frames_4x), 4)
    # whatever is left in `rest` is older than the window and is dropped

    one_x = anchor + recent
    one_x_positions = None
    others = four + two + recent
    if anchor and others and min(others) > 1:  # the window has slid past frame 1
        one_x_positions = tuple([min(others) - 1, *recent])
    history = tuple(
        GroupPlan(scale, tuple(frames), positions)
        for scale, frames, positions in (
            ("4x", four, None),
            ("2x", two, None),
            ("1x", one_x, one_x_positions),
        )
        if frames
    )
    target = GroupPlan("target", tuple(range(num_history, num_history + num_target)))
    return ChunkPlan(num_history=num_history, history=history, target=target)


# ----------------------------------------------------------------------------- packed tensors


@dataclass(frozen=True)
class TokenGroup:
    """Tensors of one token group. ``latents`` is None for the target (the sampler supplies x_t)."""

    factor: int
    frames: torch.Tensor  # (B, Tg) long, true latent-frame index of each covered frame
    positions: torch.Tensor  # (B, Tg) long, their RoPE positions (= frames but for a slid anchor)
    actions: torch.Tensor  # (B, Tg, A) raw action rows of those frames (zero-padded to A)
    flags: torch.Tensor  # (B, Tg) 1 = history frame, 0 = frame to generate
    present: torch.Tensor  # (B, Tg) 1 = a real action row, 0 = the null action (AFG, dropout, none)
    latents: torch.Tensor | None = None  # (B, C, Tg, h, w)

    def map(self, fn) -> TokenGroup:
        """Apply ``fn`` to every batched tensor."""
        return dataclasses.replace(
            self,
            frames=fn(self.frames),
            positions=fn(self.positions),
            actions=fn(self.actions),
            flags=fn(self.flags),
            present=fn(self.present),
            latents=None if self.latents is None else fn(self.latents),
        )


@dataclass(frozen=True)
class ChunkInputs:
    """Everything the transformer needs for one chunk besides x_t and the timestep."""

    context: torch.Tensor  # (B, L, text_dim) prompt embeddings
    modality: torch.Tensor  # (B,) long, index into config.model.actions.modalities
    history: tuple[TokenGroup, ...]  # in token order [4x | 2x | 1x]
    target: TokenGroup  # latents None

    @property
    def batch_size(self) -> int:
        return self.context.shape[0]

    def map(self, fn) -> ChunkInputs:
        return ChunkInputs(
            context=fn(self.context),
            modality=fn(self.modality),
            history=tuple(g.map(fn) for g in self.history),
            target=self.target.map(fn),
        )

    def to(self, device: torch.device | str, dtype: torch.dtype) -> ChunkInputs:
        """On ``device``: latents and prompt in the compute ``dtype``; action rows, flags and presence
        stay float32 (raw per-latent camera deltas would not survive bf16 before normalisation)."""

        def group(g: TokenGroup) -> TokenGroup:
            return dataclasses.replace(
                g.map(lambda t: t.to(device)),
                latents=None if g.latents is None else g.latents.to(device, dtype),
            )

        return ChunkInputs(
            context=self.context.to(device, dtype),
            modality=self.modality.to(device),
            history=tuple(group(g) for g in self.history),
            target=group(self.target),
        )

    def without_actions(self, drop: torch.Tensor | None = None) -> ChunkInputs:
        """Zero actions, flags and presence (the null condition of AFG / action dropout / action-free
        clips); ``drop`` (B,) bool selects samples, default all."""

        def zero(g: TokenGroup) -> TokenGroup:
            if drop is None:
                keep = torch.zeros(g.actions.shape[0], dtype=torch.bool, device=g.actions.device)
            else:
                keep = ~drop.to(g.actions.device)
            return dataclasses.replace(
                g,
                actions=g.actions * keep.view(-1, 1, 1).to(g.actions.dtype),
                flags=g.flags * keep.view(-1, 1).to(g.flags.dtype),
                present=g.present * keep.view(-1, 1).to(g.present.dtype),
            )

        return dataclasses.replace(
            self, history=tuple(zero(g) for g in self.history), target=zero(self.target)
        )

    def with_history_latents(self, latents: list[torch.Tensor]) -> ChunkInputs:
        """The same inputs with new history latents, one tensor per group (used by noise-as-mask)."""
        if len(latents) != len(self.history):
            raise ValueError(f"expected {len(self.history)} history tensors, got {len(latents)}")
        return dataclasses.replace(
            self,
            history=tuple(
                dataclasses.replace(g, latents=x) for g, x in zip(self.history, latents, strict=True)
            ),
        )


def concat_inputs(parts: list[ChunkInputs]) -> ChunkInputs:
    """Concatenate along the batch. Parts need the same group sizes, not the same frame indices
    (RoPE is per sample), so chunks of sessions at different rollout steps batch together once
    their windows are full."""
    first = parts[0]
    shape = [(g.factor, g.frames.shape[1]) for g in first.history]
    for p in parts[1:]:
        if [
            (g.factor, g.frames.shape[1]) for g in p.history
        ] != shape or p.target.frames.shape != first.target.frames.shape:
            raise ValueError(
                "concat_inputs: parts have different FramePack group sizes and cannot share a batch"
            )

    def cat_group(gs: list[TokenGroup]) -> TokenGroup:
        return TokenGroup(
            factor=gs[0].factor,
            frames=torch.cat([g.frames for g in gs]),
            positions=torch.cat([g.positions for g in gs]),
            actions=torch.cat([g.actions for g in gs]),
            flags=torch.cat([g.flags for g in gs]),
            present=torch.cat([g.present for g in gs]),
            latents=None if gs[0].latents is None else torch.cat([g.latents for g in gs]),
        )

    return ChunkInputs(
        context=torch.cat([p.context for p in parts]),
        modality=torch.cat([p.modality for p in parts]),
        history=tuple(cat_group([p.history[i] for p in parts]) for i in range(len(first.history))),
        target=cat_group([p.target for p in parts]),
    )


def pack_chunk(
    plan: ChunkPlan,
    history_latents: torch.Tensor | None,
    actions: torch.Tensor,
    context: torch.Tensor,
    modality: torch.Tensor,
) -> ChunkInputs:
    """Gather history latents and action rows into the plan's token groups.

    history_latents: (B, C, H, h, w) clean latents of frames 0..H-1 (None or H=0 for no history).
    actions: (B, H + T, A) one raw action row per latent frame, history then target.
    """
    num_history, num_target = plan.num_history, len(plan.target.frames)
    if actions.shape[1] != num_history + num_target:
        raise ValueError(
            f"actions: expected {num_history + num_target} rows (history {num_history} + target "
            f"{num_target}), got {actions.shape[1]}"
        )
    if num_history and (history_latents is None or history_latents.shape[2] != num_history):
        got = None if history_latents is None else history_latents.shape[2]
        raise ValueError(f"history_latents: expected {num_history} latent frames, got {got}")
    batch = actions.shape[0]

    def group(g: GroupPlan, with_latents: bool) -> TokenGroup:
        idx = torch.tensor(g.frames, dtype=torch.long, device=actions.device)
        pos = torch.tensor(g.rope_positions, dtype=torch.long, device=actions.device)
        flag = 0.0 if g.scale == "target" else 1.0
        return TokenGroup(
            factor=g.factor,
            frames=idx.expand(batch, -1),
            positions=pos.expand(batch, -1),
            actions=actions.index_select(1, idx),
            flags=torch.full((batch, len(g.frames)), flag, dtype=actions.dtype, device=actions.device),
            present=torch.ones((batch, len(g.frames)), dtype=actions.dtype, device=actions.device),
            latents=history_latents.index_select(2, idx.to(history_latents.device)) if with_latents else None,
        )

    return ChunkInputs(
        context=context,
        modality=modality,
        history=tuple(group(g, True) for g in plan.history),
        target=group(plan.target, False),
    )


# ----------------------------------------------------------------------------- embedders


class CleanXEmbedder(nn.Module):
    """Patch embedders for clean history at 1x / 2x / 4x (kernel = stride = patch x factor).

    Initialised from the backbone's patch embedding by ``init_from_patch_embedding``: the kernel is
    tiled over the larger window and divided by the volume ratio (1, 8, 64), so a compressed token is
    exactly the mean of the 1x tokens it covers — a fresh model already reads history sensibly.
    """

    def __init__(self, in_channels: int, dim: int, patch_size: tuple[int, int, int]):
        super().__init__()
        pt, ph, pw = patch_size
        # attribute names follow the reference code (proj / proj_2x / proj_4x)
        self.proj = nn.Conv3d(in_channels, dim, (pt, ph, pw), (pt, ph, pw))
        self.proj_2x = nn.Conv3d(in_channels, dim, (2 * pt, 2 * ph, 2 * pw), (2 * pt, 2 * ph, 2 * pw))
        self.proj_4x = nn.Conv3d(in_channels, dim, (4 * pt, 4 * ph, 4 * pw), (4 * pt, 4 * ph, 4 * pw))

    def conv(self, factor: int) -> nn.Conv3d:
        return {1: self.proj, 2: self.proj_2x, 4: self.proj_4x}[factor]

    @torch.no_grad()
    def init_from_patch_embedding(self, patch_embedding: nn.Conv3d) -> None:
        w, b = patch_embedding.weight, patch_embedding.bias  # (D, C, pt, ph, pw), (D,)
        for factor in (1, 2, 4):
            conv = self.conv(factor)
            conv.weight.copy_(w.repeat(1, 1, factor, factor, factor) / factor**3)
            conv.bias.copy_(b)

    def forward(self, latents: torch.Tensor, factor: int) -> torch.Tensor:
        """latents (B, C, Tg, h, w) -> tokens (B, Tg/f * ceil(h/kh) * ceil(w/kw), D)."""
        conv = self.conv(factor)
        _, kh, kw = conv.kernel_size
        pad_h, pad_w = (-latents.shape[3]) % kh, (-latents.shape[4]) % kw
        if pad_h or pad_w:
            # replicate, as FramePack does; RoPE clamps the padded positions the same way
            latents = F.pad(latents, (0, pad_w, 0, pad_h, 0, 0), mode="replicate")
        x = conv(latents.to(conv.weight.dtype))  # (B, D, S, gh, gw)
        return x.flatten(2).transpose(1, 2)
