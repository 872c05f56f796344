"""The trainable whitelist: which parameters Astra fine-tunes, and their counts.

Trainable (the paper's 366.8M on Wan-2.1 1.3B): every block's self-attention (``attn1``), the
ACT-Adapter ``projector``, the action experts ``moe``, the action encoder (modality projectors and
router) and the FramePack ``clean_x_embedder``. Everything else — patch embedding, text/time
conditioning, cross-attention, FFN, output head — stays frozen.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

TRAINABLE_PATTERNS: tuple[str, ...] = (
    r"^blocks\.\d+\.attn1\.",
    r"^blocks\.\d+\.projector\.",
    r"^blocks\.\d+\.moe\.",
    r"^action_encoder\.",
    r"^clean_x_embedder\.",
)


#: the Wan backbone's own weights — everything but Astra's additions: what ``stage=pretrain`` trains
#: (plain text-to-video, the role Wan-2.1's pretraining plays for the real model)
BACKBONE_PATTERNS: tuple[str, ...] = (
    r"^(?!clean_x_embedder\.|action_encoder\.|blocks\.\d+\.(projector|moe)\.)",
)


def is_trainable(name: str, patterns: tuple[str, ...] = TRAINABLE_PATTERNS) -> bool:
    """Whether the parameter (or buffer) called ``name`` (a state-dict key of AstraTransformer) is
    fine-tuned: it matches one of ``patterns`` (regexes searched in the key)."""
    return bool(re.search("|".join(patterns), name))


@dataclass(frozen=True)
class ParamCounts:
    trainable: int
    frozen: int

    @property
    def total(self) -> int:
        return self.trainable + self.frozen

    def __str__(self) -> str:
        return f"trainable {self.trainable / 1e6:.1f}M / frozen {self.frozen / 1e6:.1f}M / total {self.total / 1e6:.1f}M"


def count_params(model: nn.Module) -> ParamCounts:
    trainable = frozen = 0
    for p in model.parameters():
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
    return ParamCounts(trainable, frozen)


def mark_trainable(model: nn.Module, patterns: tuple[str, ...] = TRAINABLE_PATTERNS) -> ParamCounts:
    """Set ``requires_grad`` by the whitelist and report the counts."""
    for name, p in model.named_parameters():
        p.requires_grad_(is_trainable(name, patterns))
    return count_params(model)
