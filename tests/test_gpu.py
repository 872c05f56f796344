"""CUDA paths (skipped without a GPU): bf16 forward, chunk generation on the device."""

import pytest
import torch

from astra.model import AstraTransformer, build_wan, pack_chunk, plan_chunk
from astra.rollout import RolloutSession, generate_chunk

pytestmark = pytest.mark.gpu


def test_bf16_forward_on_cuda_tracks_fp32(tiny_config):
    torch.manual_seed(0)
    wan = build_wan(tiny_config.model.backbone)
    ref_model = AstraTransformer.from_wan(wan, tiny_config.model)
    x, t, ctx = torch.randn(1, 4, 2, 8, 8), torch.tensor([400.0]), torch.randn(1, 3, 384)
    inputs = pack_chunk(
        plan_chunk(4, tiny_config.model.framepack),
        torch.randn(1, 4, 4, 8, 8),
        torch.randn(1, 6, 12),
        ctx,
        torch.tensor([0]),
    )
    with torch.no_grad():
        ref, _ = ref_model(x, t, inputs)
        model = ref_model.to("cuda", torch.bfloat16)
        on_gpu = inputs.map(lambda v: v.to("cuda", torch.bfloat16) if v.is_floating_point() else v.to("cuda"))
        out, _ = model(x.to("cuda", torch.bfloat16), t.cuda(), on_gpu)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float().cpu(), ref, atol=0.1, rtol=0.1)


def test_chunk_generation_on_cuda(tiny_config):
    torch.manual_seed(0)
    model = AstraTransformer.from_wan(build_wan(tiny_config.model.backbone), tiny_config.model).to("cuda")
    s = RolloutSession.start("g", "camera", torch.randn(4, 1, 8, 8), torch.randn(3, 384), raw_dim=12, seed=0)
    s, chunk = generate_chunk(model, s, torch.randn(2, 12), tiny_config)
    assert chunk.shape == (4, 2, 8, 8) and torch.isfinite(chunk).all() and s.step == 1
