"""The Astra model: Wan-2.1 backbone reuse, ACT-Adapter, MoAE, FramePack history, RoPE at indices.

Names are resolved lazily (PEP 562) so that importing a light submodule such as ``astra.model.text``
does not pull in diffusers: Ray worker processes that only need one piece start seconds faster.
"""

from importlib import import_module

_EXPORTS = {
    "AstraTransformer": "astra.model.transformer",
    "ChunkInputs": "astra.model.framepack",
    "ChunkPlan": "astra.model.framepack",
    "TokenGroup": "astra.model.framepack",
    "pack_chunk": "astra.model.framepack",
    "plan_chunk": "astra.model.framepack",
    "build_wan": "astra.model.io",
    "load_astra": "astra.model.io",
    "load_wan": "astra.model.io",
    "save_astra": "astra.model.io",
    "count_params": "astra.model.trainable",
    "mark_trainable": "astra.model.trainable",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'astra.model' has no attribute {name!r}")
