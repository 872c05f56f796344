"""Text encoders: the embedded MiniLM default and the UMT5 path (a tiny UMT5 saved to a local folder)."""

import shutil

import pytest
import torch

from astra.config import ConfigError, TextEncoderConfig
from astra.model.text import build_text_encoder, minilm_folder, pad_context, prompt_key


@pytest.fixture(scope="module")
def minilm():
    return build_text_encoder(TextEncoderConfig(kind="minilm"))


def test_minilm_embeds_offline_per_token(minilm):
    a, b, c = minilm.encode(
        ["a car turns left at the crossing", "a car turns left at the crossing", "robot arm"]
    )
    assert a.shape[1] == 384 and a.shape[0] > c.shape[0]  # per token, unpadded
    assert torch.equal(a, b) and not torch.allclose(a[:2], c[:2])
    assert minilm.encoder_id == "minilm:all-MiniLM-L6-v2:384"


def test_umt5_from_a_local_folder(tmp_path):
    from transformers import UMT5Config, UMT5EncoderModel

    folder = tmp_path / "umt5-tiny"
    cfg = UMT5Config(vocab_size=30522, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4)
    UMT5EncoderModel(cfg).save_pretrained(folder)
    # any Hugging Face tokenizer folder works; reuse the offline MiniLM one
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_folder() / name, folder / name)
    enc = build_text_encoder(TextEncoderConfig(kind="umt5", path=str(folder), max_length=8))
    (e,) = enc.encode(["a very long prompt that will certainly be truncated to eight tokens"])
    assert e.shape == (8, 16) and enc.encoder_id == "umt5:umt5-tiny:16"
    with pytest.raises(ConfigError, match=r"text_encoder\.path"):
        build_text_encoder(TextEncoderConfig(kind="umt5", path=str(tmp_path / "missing")))


def test_prompt_keys_and_padding():
    assert prompt_key("x", "a") == prompt_key("x", "a") != prompt_key("x", "b") != prompt_key("y", "a")
    ctx = pad_context([torch.ones(3, 4), torch.ones(6, 4)], 5)
    assert ctx.shape == (2, 5, 4) and ctx[0, 3:].abs().sum() == 0 and ctx[1].sum() == 20
