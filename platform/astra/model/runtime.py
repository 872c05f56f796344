"""How a loaded model runs: the attention kernel (diffusers' attention dispatcher) and torch.compile.

Astra's blocks keep diffusers' own ``WanAttention`` modules, whose processor calls
``diffusers.models.attention_dispatch.dispatch_attention_fn`` with the processor's backend; so the
kernel is chosen the way diffusers chooses it for its own models (``ModelMixin.set_attention_backend``,
which also checks the backend's package is installed). ``auto`` picks flash-attn, then SageAttention,
when installed and on CUDA, and PyTorch's SDPA ("native") otherwise — the safe default on CPU.
Backends that download kernels from the hub (``*_hub``) are refused by the config: nothing is fetched.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from astra.config import ConfigError, RuntimeConfig

log = logging.getLogger("astra.model")

#: auto's preference on CUDA: (backend, the package it needs)
AUTO_ORDER = (("flash", "flash_attn"), ("sage", "sageattention"))


def pick_backend(name: str, device: torch.device) -> str:
    """The backend ``name`` means on ``device`` ('auto' resolved)."""
    if name != "auto":
        return name
    if device.type == "cuda":
        for backend, package in AUTO_ORDER:
            if importlib.util.find_spec(package) is not None:
                return backend
    return "native"


def set_attention_backend(model: torch.nn.Module, backend: str) -> None:
    """Every attention processor of ``model`` uses ``backend`` (diffusers' own setter, on our module)."""
    from diffusers import ModelMixin

    notices = logging.getLogger("diffusers.models.modeling_utils")  # its "experimental feature" warning
    level = notices.level
    notices.setLevel(logging.ERROR)
    try:
        ModelMixin.set_attention_backend(model, backend)
    except (RuntimeError, ValueError, ImportError) as err:  # e.g. the backend's package is missing
        raise ConfigError(f"astra.runtime.attention_backend: {backend!r} cannot run here: {err}") from err
    finally:
        notices.setLevel(level)


def apply_runtime(model: torch.nn.Module, runtime: RuntimeConfig) -> torch.nn.Module:
    """``model`` (an AstraTransformer, on its device) with the configured kernel and compilation."""
    backend = pick_backend(runtime.attention_backend, next(model.parameters()).device)
    set_attention_backend(model, backend)
    if runtime.compile:
        for block in model.blocks:
            block.compile()
    log.info("attention backend %s, compiled blocks: %s", backend, runtime.compile)
    return model
