"""The Astra model: Wan-2.1 backbone reuse, ACT-Adapter, MoAE, FramePack history, RoPE at indices."""

from astra.model.framepack import ChunkInputs, ChunkPlan, TokenGroup, pack_chunk, plan_chunk
from astra.model.io import build_wan, load_astra, load_wan, save_astra
from astra.model.trainable import count_params, mark_trainable
from astra.model.transformer import AstraTransformer

__all__ = [
    "AstraTransformer",
    "ChunkInputs",
    "ChunkPlan",
    "TokenGroup",
    "build_wan",
    "count_params",
    "load_astra",
    "load_wan",
    "mark_trainable",
    "pack_chunk",
    "plan_chunk",
    "save_astra",
]
