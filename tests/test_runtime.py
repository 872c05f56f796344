"""How a model runs: diffusers' attention dispatcher backends and compiled blocks give the chunk the
default path gives; backends that cannot run here (or would download) are named."""

from __future__ import annotations

import pytest
import torch

from astra.config import ConfigError, RuntimeConfig, derive
from astra.model.runtime import apply_runtime, pick_backend
from astra.rollout import RolloutSession, generate_chunk


def _chunk(model, config) -> torch.Tensor:
    torch.manual_seed(0)
    with torch.no_grad():  # experts off zero, so the action branch matters
        for name, p in model.named_parameters():
            if ".moe." in name:
                p.copy_(torch.randn_like(p) * 0.5)
    start = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    session = RolloutSession.start("s", "camera", start, torch.randn(5, 384), 12, seed=3)
    actions = torch.randn(
        config.model.framepack.target_frames, 12, generator=torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        return generate_chunk(model, session, actions, config)[1]


def test_attention_backends_give_the_default_chunk(tiny_config, tiny_model):
    config = derive(tiny_config, {"sampler": {"num_steps": 3}})
    default = _chunk(tiny_model, config)
    assert pick_backend("auto", torch.device("cpu")) == "native"
    for backend in ("native", "_native_math"):
        model = apply_runtime(tiny_model, RuntimeConfig(attention_backend=backend))
        # every attention processor dispatches to the backend asked for (not just the default's output)
        used = {str(m.processor._attention_backend.value) for m in model.modules() if hasattr(m, "processor")}
        assert used == {backend}
        torch.testing.assert_close(_chunk(model, config), default, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match=r"astra\.runtime\.attention_backend: 'xformers' cannot run here"):
        apply_runtime(tiny_model, RuntimeConfig(attention_backend="xformers"))  # not installed
    with pytest.raises(ConfigError, match=r"runtime\.attention_backend.*no '_hub'"):
        derive(tiny_config, {"runtime": {"attention_backend": "flash_hub"}})
    apply_runtime(tiny_model, RuntimeConfig())  # back to the default for other tests


@pytest.mark.slow
def test_compiled_blocks_give_the_default_chunk(tiny_config, tiny_wan):
    """torch.compile of every block (inductor; on CPU it builds C++ kernels: tens of seconds)."""
    from astra.model import AstraTransformer

    config = derive(tiny_config, {"sampler": {"num_steps": 2}})
    model = AstraTransformer.from_wan(tiny_wan, tiny_config.model).eval()
    default = _chunk(model, config)
    compiled = apply_runtime(model, RuntimeConfig(compile=True))
    torch.testing.assert_close(_chunk(compiled, config), default, atol=1e-4, rtol=1e-4)
