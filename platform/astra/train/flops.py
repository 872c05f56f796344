"""FLOPs of the Astra transformer, for tokens/s -> model FLOP utilisation (MFU).

Matmul FLOPs only (2 per multiply-add); norms, activations, RoPE and the tiny action encoder are
left out, as MFU conventions do. Per block, with N query tokens (packed history + target), L prompt
tokens, model width D and FFN width F, the forward costs:

    self-attention   q, k, v, out projections 4 * 2ND^2;  scores + weighted values 2 * 2N^2 D
    cross-attention  q, out 2 * 2ND^2;  k, v over the prompt 2 * 2LD^2;  scores + values 2 * 2NLD
    feed-forward     2 * 2NDF
    ACT-Adapter      projector 2ND^2

A training step is not "three forwards" here: most of the backbone is frozen. The backward pass
propagates gradients to the activations through every block (the trainable self-attention sits in
all of them), about one forward's worth per matmul, but computes *weight* gradients (another
forward's worth) only for trainable weights. Weightless matmuls (attention scores and values) cost
two forwards in backward. The prompt side of cross-attention (k, v over the text) needs no
gradient at all unless those weights train, and its scores need only the query side's. Activation
checkpointing's recompute is not counted (model FLOPs, not hardware FLOPs, as MFU defines).
"""

from __future__ import annotations

from astra.config import BackboneConfig
from astra.model.trainable import TRAINABLE_PATTERNS, is_trainable

#: dense bf16 peak of common accelerators, TFLOP/s (for ``parallel.peak_tflops: auto``)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def _block_matmuls(backbone: BackboneConfig, tokens: int, context: int) -> dict[str, int]:
    """Forward matmul FLOPs of one block by part."""
    d, f, n, lc = backbone.dim, backbone.ffn_dim, tokens, context
    return {
        "attn1.proj": 4 * 2 * n * d * d,
        "attn1.scores": 2 * 2 * n * n * d,
        "attn2.q_out": 2 * 2 * n * d * d,
        "attn2.kv": 2 * 2 * lc * d * d,
        "attn2.scores": 2 * 2 * n * lc * d,
        "ffn": 2 * 2 * n * d * f,
        "projector": 2 * n * d * d,
    }


def forward_flops(backbone: BackboneConfig, tokens: int, context: int) -> int:
    """Matmul FLOPs of one forward over ``tokens`` tokens with a ``context``-token prompt."""
    return backbone.num_layers * sum(_block_matmuls(backbone, tokens, context).values())


def backward_flops(
    backbone: BackboneConfig, tokens: int, context: int, patterns: tuple[str, ...] = TRAINABLE_PATTERNS
) -> int:
    """Matmul FLOPs of one backward with only the parameters matching ``patterns`` trainable."""
    part = _block_matmuls(backbone, tokens, context)

    def trains(key: str) -> bool:  # a representative state-dict key of the part
        return is_trainable(f"blocks.0.{key}", patterns)

    per_block = (
        part["attn1.proj"] * (1 + trains("attn1.to_q.weight"))  # activations (+ weights)
        + part["attn1.scores"] * 2  # grads of q, k (scores) and of the weights, v (values)
        + part["attn2.q_out"] * (1 + trains("attn2.to_q.weight"))
        + part["attn2.kv"] * trains("attn2.to_k.weight")  # the text needs no gradient
        + part["attn2.scores"] * (1 + trains("attn2.to_k.weight"))  # the text side's only if it trains
        + part["ffn"] * (1 + trains("ffn.net.0.proj.weight"))
        + part["projector"] * (1 + trains("projector.weight"))
    )
    return backbone.num_layers * per_block


def train_step_flops(
    backbone: BackboneConfig,
    tokens: int,
    context: int,
    samples: int,
    patterns: tuple[str, ...] = TRAINABLE_PATTERNS,
) -> int:
    """Model FLOPs of a training step over ``samples`` samples of ``tokens`` tokens each."""
    return samples * (
        forward_flops(backbone, tokens, context) + backward_flops(backbone, tokens, context, patterns)
    )


def peak_flops(device_name: str, configured: float | None) -> float | None:
    """Peak FLOP/s of one device: the configured TFLOP/s, else a known accelerator's, else None."""
    if configured is not None:
        return configured * 1e12
    for name, tflops in PEAK_TFLOPS.items():
        if name in device_name:
            return tflops * 1e12
    return None
