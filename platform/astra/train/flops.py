"""FLOPs of the Astra transformer, for tokens/s -> model FLOP utilisation (MFU).

Matmul FLOPs only (2 per multiply-add); norms, activations, RoPE and the tiny action encoder are
left out, as MFU conventions do. Per block, with N query tokens (packed history + target), L prompt
tokens, model width D and FFN width F:

    self-attention   q, k, v, out projections 4 * 2ND^2;  scores + weighted values 2 * 2N^2 D
    cross-attention  q, out 2 * 2ND^2;  k, v over the prompt 2 * 2LD^2;  scores + values 2 * 2NLD
    feed-forward     2 * 2NDF
    ACT-Adapter      projector 2ND^2

A training step costs three forwards (the backward pass computes gradients with respect to both
activations and weights: about twice the forward).
"""

from __future__ import annotations

from astra.config import BackboneConfig

#: dense bf16 peak of common accelerators, TFLOP/s (for ``parallel.peak_tflops: auto``)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def forward_flops(backbone: BackboneConfig, tokens: int, context: int) -> int:
    """Matmul FLOPs of one forward over ``tokens`` tokens with a ``context``-token prompt."""
    d, f, n, lc = backbone.dim, backbone.ffn_dim, tokens, context
    self_attn = 4 * 2 * n * d * d + 2 * 2 * n * n * d
    cross_attn = 2 * 2 * n * d * d + 2 * 2 * lc * d * d + 2 * 2 * n * lc * d
    ffn = 2 * 2 * n * d * f
    projector = 2 * n * d * d
    return backbone.num_layers * (self_attn + cross_attn + ffn + projector)


def train_step_flops(backbone: BackboneConfig, tokens: int, context: int, samples: int) -> int:
    return 3 * samples * forward_flops(backbone, tokens, context)


def peak_flops(device_name: str, configured: float | None) -> float | None:
    """Peak FLOP/s of one device: the configured TFLOP/s, else a known accelerator's, else None."""
    if configured is not None:
        return configured * 1e12
    for name, tflops in PEAK_TFLOPS.items():
        if name in device_name:
            return tflops * 1e12
    return None
