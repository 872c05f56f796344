"""Loading backbones (diffusers folder, original/DiffSynth keys) and Astra checkpoints; preset sizes."""

import json

import pytest
import torch
from safetensors.torch import save_file

from astra.config import ConfigError, preset
from astra.model import (
    AstraTransformer,
    build_wan,
    count_params,
    load_astra,
    load_wan,
    mark_trainable,
    pack_chunk,
    plan_chunk,
    save_astra,
)


def _forward(model, seed=0):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    inputs = pack_chunk(
        plan_chunk(5, cfg.framepack),
        torch.randn(1, 4, 5, 8, 8, generator=g),
        torch.randn(1, 7, 12, generator=g),
        torch.randn(1, 3, 384, generator=g),
        torch.tensor([0]),
    )
    with torch.no_grad():
        return model(torch.randn(1, 4, 2, 8, 8, generator=g), torch.tensor([321.0]), inputs)[0]


def _perturb_adapters(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(k in n for k in ("projector", "moe", "action_encoder", "clean_x_embedder", "attn1")):
                p.add_(0.05 * torch.randn_like(p))
    return model


# Inverse of diffusers' convert_wan_transformer_to_diffusers, to write an original-keyed file.
_TO_ORIGINAL = [
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn2", "cross_attn"),
    ("attn1", "self_attn"),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    ("proj_out", "head.head"),
]


def _to_original_key(k: str) -> str:
    if k == "scale_shift_table":
        return "head.modulation"
    for a, b in _TO_ORIGINAL:
        k = k.replace(a, b)
    k = k.replace("scale_shift_table", "modulation")
    # diffusers' norm2 (cross-attn) is the original norm3 and vice versa
    return k.replace("norm2", "norm__x").replace("norm3", "norm2").replace("norm__x", "norm3")


def test_full_and_adapter_checkpoints_round_trip(tmp_path, tiny_wan, tiny_model):
    model = _perturb_adapters(tiny_model)
    want = _forward(model)
    save_astra(model, tmp_path / "full")
    save_astra(model, tmp_path / "adapter", adapter_only=True)
    assert json.loads((tmp_path / "full" / "astra_config.json").read_text())["kind"] == "full"
    full = load_astra(tmp_path / "full")
    torch.testing.assert_close(_forward(full), want, atol=0, rtol=0)
    # the adapter file holds only the whitelist and is much smaller than the full one
    sizes = {
        p: (tmp_path / p / f).stat().st_size
        for p, f in (("full", "model.safetensors"), ("adapter", "adapter.safetensors"))
    }
    assert sizes["adapter"] < sizes["full"]
    adapter = load_astra(tmp_path / "adapter", base=tiny_wan)
    torch.testing.assert_close(_forward(adapter), want, atol=0, rtol=0)
    with pytest.raises(ConfigError, match="needs the base Wan weights"):
        load_astra(tmp_path / "adapter")


def test_diffusers_folder_backbone(tmp_path, tiny_wan, tiny_config):
    tiny_wan.save_pretrained(tmp_path / "wan")
    loaded = load_wan(tmp_path / "wan")
    a = AstraTransformer.from_wan(tiny_wan, tiny_config.model)
    b = AstraTransformer.from_wan(loaded, tiny_config.model)
    for k, v in tiny_wan.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # same weights; from_pretrained's memory-mapped tensors may take other SIMD paths: fp32 tolerance
    torch.testing.assert_close(_forward(b), _forward(a), atol=1e-5, rtol=1e-5)
    # adapter checkpoint on top of a backbone given by path
    save_astra(_perturb_adapters(a), tmp_path / "ad", adapter_only=True)
    c = load_astra(tmp_path / "ad", base=tmp_path / "wan")
    torch.testing.assert_close(_forward(c), _forward(a), atol=1e-5, rtol=1e-5)


def test_original_keyed_checkpoint_through_diffusers_converter(tmp_path, tiny_wan, tiny_config):
    original = {
        _to_original_key(k): v.clone() for k, v in tiny_wan.state_dict().items() if not k.startswith("rope.")
    }
    assert "blocks.0.self_attn.q.weight" in original and "head.modulation" in original
    path = tmp_path / "wan_original.safetensors"
    save_file(original, str(path))
    loaded = load_wan(path, backbone=tiny_config.model.backbone)
    for k, v in tiny_wan.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    a = AstraTransformer.from_wan(tiny_wan, tiny_config.model)
    b = AstraTransformer.from_wan(loaded, tiny_config.model)
    torch.testing.assert_close(_forward(b), _forward(a), atol=1e-5, rtol=1e-5)  # same weights, other memory
    with pytest.raises(ConfigError, match=r"needs model\.backbone"):
        load_wan(path)
    wrong = tiny_config.model.backbone.model_copy(update={"num_layers": 3})
    with pytest.raises(ConfigError, match="missing"):
        load_wan(path, backbone=wrong)


def test_pickle_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"not allowed")
    with pytest.raises(ConfigError, match="pickled"):
        load_wan(path)


def test_wan_1_3b_preset_sizes_on_meta():
    cfg = preset("wan2.1-1.3b").model
    wan = build_wan(cfg.backbone, device="meta")
    base = count_params(wan).total
    assert abs(base - 1.42e9) < 0.01e9, base  # Wan-2.1 T2V 1.3B: 1,418,996,800 parameters
    model = AstraTransformer.from_wan(wan, cfg)
    counts = mark_trainable(model)
    # the paper's whitelist is 366.8M (its per-block cam_encoder, unused with MoAE, adds the last 0.6M)
    assert 360e6 < counts.trainable < 370e6, counts
    assert counts.total - base == sum(
        p.numel()
        for n, p in model.named_parameters()
        if n.split(".")[0] in ("clean_x_embedder", "action_encoder") or ".projector." in n or ".moe." in n
    )
