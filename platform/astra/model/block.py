"""The Astra block: a diffusers ``WanTransformerBlock`` plus the ACT-Adapter and the block's experts.

Per block (DESIGN.md §1):
    input = modulate(norm1(x)) + action_features       # action features enter self-attention's input
    x     = x + gate_msa * projector(self_attn(input))  # projector: the ACT-Adapter, identity at init
    x     = x + cross_attn(norm2(x), text)              # frozen, untouched
    x     = x + gate_mlp * ffn(modulate(norm3(x)))      # frozen, untouched

The pretrained submodules are the *same objects* as in the Wan block (no copy) under the same
names, so parameter names — and therefore checkpoints — match diffusers' layout, plus
``projector.*`` and ``moe.*``. The fp32 islands (norms, modulation, residual adds) mirror diffusers'
block exactly, which is what makes the zero-action parity test bitwise.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from diffusers.models.transformers.transformer_wan import WanTransformerBlock
from torch import nn

from astra.model.actions import ActionExperts


class BlockActions(NamedTuple):
    """The chunk's encoded actions, computed once per forward and handed to every block, which turns
    them into its own per-token features *inside* its forward (under FSDP2 a block's experts are
    gathered only there)."""

    unified: torch.Tensor  # (B, R, U) one unified vector per action row
    gates: torch.Tensor  # (B, R, E) expert gates
    pool: torch.Tensor  # (S, R) averages rows (latent frames) into token slots
    token_slot: torch.Tensor  # (N,) slot of every token


class AstraBlock(nn.Module):
    def __init__(self, wan_block: WanTransformerBlock, unified_dim: int, num_experts: int):
        super().__init__()
        dim = wan_block.scale_shift_table.shape[-1]
        factory = {
            "device": wan_block.scale_shift_table.device,
            "dtype": wan_block.attn1.to_out[0].weight.dtype,
        }
        # 1. pretrained Wan submodules, reused
        self.norm1 = wan_block.norm1
        self.attn1 = wan_block.attn1
        self.attn2 = wan_block.attn2
        self.norm2 = wan_block.norm2
        self.ffn = wan_block.ffn
        self.norm3 = wan_block.norm3
        self.scale_shift_table = wan_block.scale_shift_table
        # 2. Astra additions (initialised in reset_adapters, called by AstraTransformer.init_adapters)
        self.projector = nn.Linear(dim, dim, **factory)
        self.moe = ActionExperts(unified_dim, dim, num_experts).to(**factory)

    @torch.no_grad()
    def reset_adapters(self) -> None:
        """ACT-Adapter = identity, experts = zero: the block computes exactly the pretrained block."""
        self.projector.weight.copy_(torch.eye(self.projector.in_features, dtype=self.projector.weight.dtype))
        self.projector.bias.zero_()
        self.moe.reset_parameters()

    def action_features(self, actions: BlockActions) -> torch.Tensor:
        """This block's experts on the action rows, pooled to slots and spread over tokens: (B, N, D)."""
        per_frame = self.moe(actions.unified, actions.gates)  # (B, R, D)
        per_slot = torch.einsum("sr,brd->bsd", actions.pool.to(per_frame.dtype), per_frame)  # (B, S, D)
        return per_slot.index_select(1, actions.token_slot)

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, N, D)
        encoder_hidden_states: torch.Tensor,  # (B, L, D) projected text
        temb: torch.Tensor,  # (B, 6, D) timestep projection
        rotary_emb: tuple[torch.Tensor, torch.Tensor],  # cos, sin: (B, N, 1, head_dim)
        actions: BlockActions | None = None,
    ) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = (
            self.scale_shift_table + temb.float()
        ).chunk(6, dim=1)

        # 1. Self-attention with action injection and the ACT-Adapter
        norm_hidden_states = (self.norm1(hidden_states.float()) * (1 + scale_msa) + shift_msa).type_as(
            hidden_states
        )
        if actions is not None:
            norm_hidden_states = norm_hidden_states + self.action_features(actions).to(
                norm_hidden_states.dtype
            )
        attn_output = self.attn1(norm_hidden_states, None, None, rotary_emb)
        attn_output = self.projector(attn_output)
        hidden_states = (hidden_states.float() + attn_output * gate_msa).type_as(hidden_states)

        # 2. Cross-attention (frozen)
        norm_hidden_states = self.norm2(hidden_states.float()).type_as(hidden_states)
        attn_output = self.attn2(norm_hidden_states, encoder_hidden_states, None, None)
        hidden_states = hidden_states + attn_output

        # 3. Feed-forward (frozen)
        norm_hidden_states = (self.norm3(hidden_states.float()) * (1 + c_scale_msa) + c_shift_msa).type_as(
            hidden_states
        )
        ff_output = self.ffn(norm_hidden_states)
        hidden_states = (hidden_states.float() + ff_output.float() * c_gate_msa).type_as(hidden_states)
        return hidden_states
