"""FramePack packing: token budget, frame/action alignment for long rollouts, embedders, RoPE."""

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

from astra.config import FramePackConfig, preset
from astra.model import pack_chunk, plan_chunk
from astra.model.framepack import CleanXEmbedder
from astra.model.rope import rope_at

HISTORY_LENGTHS = [0, 1, 2, 5, 19, 20, 21, 40, 100]


# ----------------------------------------------------------------------------- token budget


def test_token_budget_wan_1_3b_at_480x832():
    cfg = preset("wan2.1-1.3b").model
    latent_hw = (480 // 8, 832 // 8)  # (60, 104)
    budgets = {}
    for n in HISTORY_LENGTHS:
        plan = plan_chunk(n, cfg.framepack)
        assert plan.target_tokens(latent_hw) == 12_480  # 8 latents x 30 x 52
        budgets[n] = plan.history_tokens(latent_hw)
    # window = anchor 1 + 4x 16 + 2x 2 + recent 1 = 20 frames: constant from there on
    full = budgets[20]
    assert 3_800 <= full <= 4_000, full  # 1x: 2 x 1560, 2x: 1 x 390, 4x: 4 x 104 = 3926
    assert full == 2 * 1560 + 390 + 4 * 104
    assert all(budgets[n] == full for n in (20, 21, 40, 100))
    assert budgets[0] == 0 and budgets[1] == 1560 and budgets[2] == 3120
    ordered = [budgets[n] for n in HISTORY_LENGTHS]
    assert ordered == sorted(ordered)  # never more than the full window


def test_model_sequence_matches_plan(tiny_config, tiny_model):
    """The token count the plan promises is the sequence the blocks actually see."""
    cfg = tiny_config.model
    seen = []
    hook = tiny_model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    try:
        for n in (0, 1, 3, 6, 11, 30):
            plan = plan_chunk(n, cfg.framepack)
            inputs = pack_chunk(
                plan,
                torch.randn(1, 4, n, 8, 12),
                torch.randn(1, n + 2, 12),
                torch.randn(1, 3, 384),
                torch.tensor([0]),
            )
            with torch.no_grad():
                tiny_model(torch.randn(1, 4, 2, 8, 12), torch.tensor([10.0]), inputs)
            assert seen[-1] == plan.history_tokens((8, 12)) + plan.target_tokens((8, 12))
    finally:
        hook.remove()


# ----------------------------------------------------------------------------- alignment


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 19, 20, 21, 22, 40, 41, 57, 100, 333])
def test_plan_covers_the_right_frames(n):
    layout = FramePackConfig()
    plan = plan_chunk(n, layout)
    window = 1 + layout.recent_frames + layout.frames_2x + layout.frames_4x
    covered = sorted({f for g in plan.history for f in g.frames})
    if n <= window:
        assert covered == list(range(n))  # nothing dropped before the window is full
    else:
        assert covered == [0, *range(n - window + 1, n)]  # anchor + the newest frames
    for g in plan.history:
        assert len(g.frames) % g.factor == 0
        assert list(g.frames) == sorted(g.frames)  # chronological inside a group
    one_x = next((g for g in plan.history if g.scale == "1x"), None)
    if n:
        assert one_x.frames[0] == 0 and one_x.frames[-1] == n - 1  # anchor + most recent
    assert plan.target.frames == tuple(range(n, n + layout.target_frames))


def test_anchor_rope_position_moves_with_the_window():
    layout = FramePackConfig()  # the reference layout: window of 1 + 16 + 2 + 1 latents, 8 targets
    for n in (1, 2, 19, 20):  # the window still reaches frame 1: the anchor sits at its true index
        one_x = plan_chunk(n, layout).history[-1]
        assert one_x.rope_positions == one_x.frames
    for n in (21, 40, 333):
        plan = plan_chunk(n, layout)
        one_x = plan.history[-1]
        oldest = min(f for g in plan.history for f in g.frames if f != 0)
        assert one_x.frames[0] == 0 and one_x.rope_positions[0] == oldest - 1  # just before the window
        assert one_x.rope_positions[1:] == one_x.frames[1:]  # every other frame at its true index


def _rope_spread(n: int, layout: FramePackConfig) -> int:
    """Largest RoPE distance (in latent frames) inside the chunk that follows ``n`` history latents."""
    inputs = pack_chunk(
        plan_chunk(n, layout),
        torch.zeros(1, 1, n, 1, 1) if n else None,
        torch.zeros(1, n + layout.target_frames, 1),
        torch.zeros(1, 1, 1),
        torch.tensor([0]),
    )
    pos = torch.cat([g.positions[0] for g in (*inputs.history, inputs.target)])
    return int(pos.max() - pos.min())


@pytest.mark.parametrize("layout", [FramePackConfig(), FramePackConfig(target_frames=2, frames_4x=4)])
def test_rope_distances_stay_in_the_training_range_over_100_chunks(layout):
    """Every query-key RoPE distance of a 100-chunk rollout lies within what chunks of clips no
    longer than the window produce (what training sees), for the real and the tiny layout."""
    window = 1 + layout.recent_frames + layout.frames_2x + layout.frames_4x
    trained = max(_rope_spread(n, layout) for n in range(window + 2))  # clips that fill the window once
    rollout = [_rope_spread(1 + k * layout.target_frames, layout) for k in range(100)]
    assert max(rollout) <= trained, (max(rollout), trained)
    assert max(rollout) <= window + layout.target_frames  # bounded, not growing with the rollout


def test_anchor_dropped_when_configured():
    layout = FramePackConfig(keep_anchor=False)
    plan = plan_chunk(40, layout)
    covered = sorted({f for g in plan.history for f in g.frames})
    assert covered == list(range(40 - 19, 40))


def test_long_rollout_every_token_reads_its_own_frames_actions(tiny_config, tiny_model):
    """Over a 48-latent rollout (each latent's action distinct) every token of every group receives
    the action features of exactly the latent frames it covers — checked at the block input, against
    an independent recomputation from the plan. (The reference code reads wrong rows after 20.)"""
    cfg = tiny_config.model.model_copy(update={"framepack": FramePackConfig()})  # reference layout
    model = tiny_model
    model.config = cfg
    torch.manual_seed(0)
    with torch.no_grad():  # make the action path non-trivial: random experts
        for block in model.blocks:
            for e in block.moe.experts:
                e.weight.normal_()
                e.bias.normal_()
    total = 48 + cfg.framepack.target_frames
    actions = torch.arange(total, dtype=torch.float32)[:, None] * torch.linspace(
        0.1, 1.2, 12
    )  # distinct rows
    hist = torch.arange(48, dtype=torch.float32).view(1, 1, 48, 1, 1).expand(1, 4, 48, 8, 8).contiguous()
    captured = []
    hook = model.blocks[1].register_forward_hook(
        lambda m, args, kwargs, out: captured.append(args[4]), with_kwargs=True
    )
    try:
        for n in (19, 20, 21, 33, 48):
            plan = plan_chunk(n, cfg.framepack)
            inputs = pack_chunk(
                plan, hist[:, :, :n], actions[None, : n + 8], torch.randn(1, 3, 384), torch.tensor([0])
            )
            # every group's latents, action rows and flags come from the same frames
            for plan_g, g in zip(plan.history, inputs.history, strict=True):
                assert g.frames[0].tolist() == list(plan_g.frames)
                assert torch.equal(g.latents[0, 0, :, 0, 0], g.frames[0].float())
                assert torch.equal(g.actions[0], actions[g.frames[0]])
                assert torch.all(g.flags == 1)
            assert torch.equal(inputs.target.actions[0], actions[n : n + 8]) and torch.all(
                inputs.target.flags == 0
            )
            # the most recent history frame carries its own action, not the first target's
            one_x = inputs.history[-1]
            assert torch.equal(one_x.actions[0, -1], actions[n - 1])

            with torch.no_grad():
                model(torch.randn(1, 4, 8, 8, 8), torch.tensor([500.0]), inputs)
            features = model.blocks[1].action_features(captured[-1])[0]  # (N, D) at the block's input
            # independent recomputation: token order [4x | 2x | 1x | target], slots of `factor` frames
            unified, gates, _ = model.action_encoder(
                torch.cat([g.actions for g in (*inputs.history, inputs.target)], 1),
                torch.cat([g.flags for g in (*inputs.history, inputs.target)], 1),
                inputs.modality,
            )
            per_frame = model.blocks[1].moe(unified, gates)[0]  # (R, D)
            row, tok = 0, 0
            for plan_g in plan.groups:
                per_slot = plan_g.tokens_per_slot((8, 8), (2, 2))
                for _slot in range(plan_g.num_slots):
                    want = per_frame[row : row + plan_g.factor].mean(0)
                    got = features[tok : tok + per_slot]
                    torch.testing.assert_close(got, want.expand_as(got), atol=1e-5, rtol=1e-5)
                    row += plan_g.factor
                    tok += per_slot
            assert tok == features.shape[0]
    finally:
        hook.remove()


# ----------------------------------------------------------------------------- embedders and RoPE


def test_clean_x_embedder_init_means_of_1x_tokens(tiny_model):
    emb: CleanXEmbedder = tiny_model.clean_x_embedder
    x = torch.randn(2, 4, 4, 8, 8)
    with torch.no_grad():
        t1 = tiny_model.patch_embedding(x)  # (B, D, 4, 4, 4) 1x tokens
        torch.testing.assert_close(emb(x, 1), t1.flatten(2).transpose(1, 2))
        for f in (2, 4):
            want = torch.nn.functional.avg_pool3d(t1, f).flatten(2).transpose(1, 2)
            torch.testing.assert_close(emb(x, f), want, atol=1e-5, rtol=1e-5)


def test_rope_at_contiguous_indices_equals_diffusers():
    head_dim, frames, h, w = 128, 5, 12, 20
    ref = WanRotaryPosEmbed(head_dim, (1, 2, 2), 1024)
    cos_ref, sin_ref = ref(torch.zeros(1, 16, frames, 2 * h, 2 * w))
    cos, sin = rope_at(head_dim, torch.arange(frames)[None], (h, w))
    assert cos.shape == cos_ref.shape == (1, frames * h * w, 1, head_dim)
    torch.testing.assert_close(cos, cos_ref, atol=0, rtol=0)
    torch.testing.assert_close(sin, sin_ref, atol=0, rtol=0)


def test_rope_at_offsets_and_pooling():
    head_dim, h, w = 24, 6, 10
    big = WanRotaryPosEmbed(head_dim, (1, 2, 2), 1024)
    cos_all, _ = big(torch.zeros(1, 4, 50, 2 * h, 2 * w))
    cos_all = cos_all.view(50, h, w, head_dim)
    # explicit, non-contiguous frame indices read the matching rows of the full table
    cos, _ = rope_at(head_dim, torch.tensor([[0, 7, 49]]), (h, w))
    torch.testing.assert_close(cos.view(3, h, w, head_dim), cos_all[[0, 7, 49]])
    # a 2x token is the mean over its 2x2x2 block of full-resolution positions
    cos2, _ = rope_at(head_dim, torch.tensor([[10, 11, 12, 13]]), (h, w), (2, 2, 2))
    want = cos_all[10:14].view(2, 2, h // 2, 2, w // 2, 2, head_dim).mean((1, 3, 5))
    torch.testing.assert_close(cos2.view(2, h // 2, w // 2, head_dim), want, atol=1e-6, rtol=0)
    # 4x over a grid that does not divide: padded positions repeat the last row / column
    cos4, _ = rope_at(head_dim, torch.tensor([[20, 21, 22, 23]]), (h, w), (4, 4, 4))
    rows = torch.arange(8).clamp(max=h - 1)
    cols = torch.arange(12).clamp(max=w - 1)
    padded = cos_all[20:24][:, rows][:, :, cols]  # (4, 8, 12, D)
    want4 = padded.view(1, 4, 2, 4, 3, 4, head_dim).mean((1, 3, 5))
    torch.testing.assert_close(cos4.view(1, 2, 3, head_dim), want4, atol=1e-6, rtol=0)
