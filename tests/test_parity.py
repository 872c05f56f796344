"""A fresh AstraTransformer computes exactly what the pretrained Wan computes (no history)."""

import pytest
import torch

from astra.config import ModelConfig
from astra.model import AstraTransformer, pack_chunk, plan_chunk


def _inputs(cfg, batch, actions, context, modality):
    plan = plan_chunk(0, cfg.framepack)
    return pack_chunk(plan, None, actions, context, modality)


@pytest.mark.parametrize("routing", ["hard", "learned"])
def test_fresh_model_matches_wan_for_any_actions(tiny_config, tiny_wan, routing):
    cfg = tiny_config.model.model_copy(
        update={"actions": tiny_config.model.actions.model_copy(update={"routing": routing})}
    )
    model = AstraTransformer.from_wan(tiny_wan, cfg)
    torch.manual_seed(1)
    batch, frames = 3, cfg.framepack.target_frames
    x = torch.randn(batch, 4, frames, 8, 12)
    t = torch.tensor([999.0, 500.0, 3.0])
    context = torch.randn(batch, 7, cfg.backbone.text_dim)
    with torch.no_grad():
        ref = tiny_wan(x, t, context).sample
        for scale in (0.0, 1.0, 100.0):  # any actions, any modality
            actions = scale * torch.randn(batch, frames, cfg.actions.max_raw_dim)
            out, _ = model(x, t, _inputs(cfg, batch, actions, context, torch.tensor([0, 1, 2])))
            assert out.shape == ref.shape
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_from_wan_derives_config_and_rejects_mismatch(tiny_wan, tiny_config):
    model = AstraTransformer.from_wan(tiny_wan)
    assert model.config.backbone == tiny_config.model.backbone
    bad = ModelConfig(backbone=tiny_config.model.backbone.model_copy(update={"num_layers": 5}))
    with pytest.raises(ValueError, match="num_layers: 5 vs 2"):
        AstraTransformer.from_wan(tiny_wan, bad)


def test_wan_modules_are_reused_not_copied(tiny_wan, tiny_model):
    assert tiny_model.blocks[0].attn1 is tiny_wan.blocks[0].attn1
    assert tiny_model.blocks[1].ffn is tiny_wan.blocks[1].ffn
    assert tiny_model.patch_embedding is tiny_wan.patch_embedding
    # parameter names are diffusers' names plus the Astra additions
    wan_keys = set(tiny_wan.state_dict())
    astra_keys = set(tiny_model.state_dict())
    assert wan_keys - astra_keys == {k for k in wan_keys if k.startswith("rope.")}
    extra = {
        k.split(".")[0] if not k.startswith("blocks.") else k.split(".")[2] for k in astra_keys - wan_keys
    }
    assert extra == {"clean_x_embedder", "action_encoder", "projector", "moe"}


def test_history_changes_the_prediction(tiny_config, tiny_model):
    """Sanity: the history path is live (a packed history changes the target's velocity)."""
    cfg = tiny_config.model
    x = torch.randn(1, 4, 2, 8, 8)
    t = torch.tensor([500.0])
    ctx = torch.randn(1, 3, cfg.backbone.text_dim)
    acts0 = torch.zeros(1, 2, 12)
    plan = plan_chunk(5, cfg.framepack)
    with torch.no_grad():
        a, _ = tiny_model(x, t, pack_chunk(plan_chunk(0, cfg.framepack), None, acts0, ctx, torch.tensor([0])))
        hist = torch.randn(1, 4, 5, 8, 8)
        b, _ = tiny_model(x, t, pack_chunk(plan, hist, torch.zeros(1, 7, 12), ctx, torch.tensor([0])))
    assert (a - b).abs().max() > 1e-3
