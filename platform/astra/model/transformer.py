"""AstraTransformer: Wan-2.1's diffusion transformer turned into an action-conditioned world model.

Built from a diffusers ``WanTransformer3DModel`` by ``from_wan``: the patch embedding, condition
embedder, blocks, output norm and head are the pretrained modules themselves (same parameter
names); Astra adds the FramePack history embedders, the action encoder / router and, per block,
the ACT-Adapter projector and the action experts. ``init_adapters`` is the one place where the
additions are initialised, all as no-ops: a fresh model computes exactly what the Wan model
computes (the parity test).

Forward of one chunk (DESIGN.md §1):
  1. embed history groups (clean, 1x/2x/4x) and the noisy target; RoPE at their true frame indices
  2. timestep + text conditioning (Wan's condition embedder)
  3. action rows -> unified vectors + expert gates (once); per block -> features per latent frame,
     averaged over each compressed slot, broadcast to that slot's tokens
  4. blocks over ``[4x | 2x | 1x | target]`` tokens
  5. output head on the target tokens only -> velocity (B, C, T, h, w)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import WanTransformer3DModel
from torch import nn
from torch.utils.checkpoint import checkpoint

from astra.config import BackboneConfig, ConfigError, ModelConfig
from astra.model.actions import ActionEncoder
from astra.model.block import AstraBlock, BlockActions
from astra.model.framepack import ChunkInputs, CleanXEmbedder, TokenGroup
from astra.model.rope import rope_at


@dataclass(frozen=True)
class TokenLayout:
    """Per-forward bookkeeping shared by all blocks."""

    rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin: (B, N, 1, head_dim)
    pool: torch.Tensor  # (S, R) averages action rows (latent frames) into token slots
    token_slot: torch.Tensor  # (N,) long, slot of every token
    num_target_tokens: int


class AstraTransformer(nn.Module):
    def __init__(self, config: ModelConfig, wan: WanTransformer3DModel):
        super().__init__()
        self.config = config
        bb = config.backbone
        factory = {"device": wan.patch_embedding.weight.device, "dtype": wan.patch_embedding.weight.dtype}
        # 1. pretrained Wan modules, reused under their diffusers names
        self.patch_embedding = wan.patch_embedding
        self.condition_embedder = wan.condition_embedder
        self.blocks = nn.ModuleList(
            [AstraBlock(b, config.actions.unified_dim, config.actions.num_experts) for b in wan.blocks]
        )
        self.norm_out = wan.norm_out
        self.proj_out = wan.proj_out
        self.scale_shift_table = wan.scale_shift_table
        # 2. Astra additions
        self.clean_x_embedder = CleanXEmbedder(bb.in_channels, bb.dim, bb.patch_size).to(**factory)
        self.action_encoder = ActionEncoder(config.actions).to(**factory)
        self.gradient_checkpointing = False

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_wan(cls, wan: WanTransformer3DModel, config: ModelConfig | None = None) -> AstraTransformer:
        """Wrap a pretrained Wan transformer. ``config`` defaults to Astra's defaults on this backbone."""
        derived = BackboneConfig.from_wan_config(wan.config)
        if config is None:
            config = ModelConfig(backbone=derived)
        elif config.backbone != derived:
            diff = config.backbone.differences(derived)
            if diff:
                raise ConfigError(
                    "model.backbone does not match the Wan checkpoint (field: config vs checkpoint): "
                    + ", ".join(f"{k}: {a} vs {b}" for k, (a, b) in diff.items())
                )
        model = cls(config, wan)
        model.init_adapters()
        return model

    @torch.no_grad()
    def init_adapters(self) -> None:
        """The one place Astra's additions are initialised — every one of them as a no-op."""
        for block in self.blocks:
            block.reset_adapters()
        self.clean_x_embedder.init_from_patch_embedding(self.patch_embedding)
        # action projectors / router keep PyTorch's default init: their output only reaches the
        # backbone through the zero-initialised experts

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.proj_out.weight.device

    # ------------------------------------------------------------------ forward helpers

    def token_layout(
        self, inputs: ChunkInputs, target_hw: tuple[int, int], num_target_frames: int
    ) -> TokenLayout:
        """RoPE, action pooling and token->slot map of a chunk. Depends only on the inputs' frame
        positions and sizes, not on x_t or t: a sampler computes it once and passes it to every step."""
        bb = self.config.backbone
        _, ph, pw = bb.patch_size
        base = (target_hw[0] // ph, target_hw[1] // pw)
        groups: list[TokenGroup] = [*inputs.history, inputs.target]
        if inputs.target.frames.shape[1] != num_target_frames:
            raise ValueError(
                f"inputs.target covers {inputs.target.frames.shape[1]} frames but x_t has {num_target_frames}"
            )
        cos, sin, slot_sizes, pools = [], [], [], []
        for g in groups:
            c, s = rope_at(bb.attention_head_dim, g.positions, base, (g.factor,) * 3)
            cos.append(c)
            sin.append(s)
            slots = g.frames.shape[1] // g.factor
            per_slot = c.shape[1] // slots
            slot_sizes += [per_slot] * slots
            # each slot averages the `factor` consecutive action rows (frames) it covers
            pools.append(torch.kron(torch.eye(slots), torch.full((1, g.factor), 1.0 / g.factor)))
        device = self.device
        pool = torch.block_diag(*pools).to(device)
        token_slot = torch.repeat_interleave(torch.arange(len(slot_sizes)), torch.tensor(slot_sizes)).to(
            device
        )
        rope = (torch.cat(cos, 1).to(device), torch.cat(sin, 1).to(device))
        return TokenLayout(rope=rope, pool=pool, token_slot=token_slot, num_target_tokens=cos[-1].shape[1])

    def _embed_tokens(self, x_t: torch.Tensor, inputs: ChunkInputs) -> torch.Tensor:
        parts = [self.clean_x_embedder(g.latents, g.factor) for g in inputs.history]
        # x_t in the compute dtype (FSDP2 does not cast forward inputs: see train.parallelize)
        x_t = x_t.to(self.patch_embedding.weight.dtype)
        target = self.patch_embedding(x_t).flatten(2).transpose(1, 2)  # (B, T*h/2*w/2, D)
        tokens = torch.cat([*parts, target], dim=1).contiguous()  # (B, N, D)
        if self.training and torch.is_grad_enabled():
            # Every history embedder takes part in every training step, with a zero contribution when
            # its scale is absent (a one-latent history has no 2x/4x group): under FSDP2 a parameter
            # with a gradient on one rank and none on another breaks the gradient reduce-scatter.
            used = {g.factor for g in inputs.history}
            idle = [p for f in (1, 2, 4) if f not in used for p in self.clean_x_embedder.conv(f).parameters()]
            if idle:
                tokens = tokens + sum(p.sum() for p in idle) * 0.0
        return tokens

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        x_t: torch.Tensor,
        timestep: torch.Tensor,
        inputs: ChunkInputs,
        layout: TokenLayout | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x_t (B, C, T, h, w) noisy target latents, timestep (B,) = sigma * 1000.

        Returns the predicted velocity v = eps - x0 for the target, (B, C, T, h, w), and aux
        outputs: ``router_loss`` (scalar, zero under hard routing) and ``expert_usage`` (E,).
        """
        batch, _, num_frames, height, width = x_t.shape
        _, ph, pw = self.config.backbone.patch_size
        if layout is None:
            layout = self.token_layout(inputs, (height, width), num_frames)

        # 1. tokens
        hidden_states = self._embed_tokens(x_t, inputs)

        # 2. timestep + text (the prompt in the compute dtype: under FSDP2 mixed precision the
        # gathered weights are bf16 while callers may hand float32 inputs)
        context = inputs.context.to(self.patch_embedding.weight.dtype)
        temb, timestep_proj, context, _ = self.condition_embedder(timestep, context, None)
        timestep_proj = timestep_proj.unflatten(1, (6, -1))  # (B, 6, D)

        # 3. actions: rows of all groups in token order -> unified vectors and gates (once)
        groups = [*inputs.history, inputs.target]
        rows = torch.cat([g.actions for g in groups], dim=1)  # (B, R, A)
        flags = torch.cat([g.flags for g in groups], dim=1)  # (B, R)
        present = torch.cat([g.present for g in groups], dim=1)  # (B, R)
        unified, gates, router_loss = self.action_encoder(rows, flags, inputs.modality, present)

        actions = BlockActions(unified, gates, layout.pool, layout.token_slot)

        def block_fn(block: AstraBlock, h: torch.Tensor) -> torch.Tensor:
            return block(h, context, timestep_proj, layout.rope, actions)

        # 4. blocks
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                hidden_states = checkpoint(block_fn, block, hidden_states, use_reentrant=False)
            else:
                hidden_states = block_fn(block, hidden_states)

        # 5. head on the target tokens, unpatchify
        hidden_states = hidden_states[:, -layout.num_target_tokens :]
        shift, scale = (self.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        hidden_states = (self.norm_out(hidden_states.float()) * (1 + scale) + shift).type_as(hidden_states)
        hidden_states = self.proj_out(hidden_states)
        hidden_states = hidden_states.reshape(batch, num_frames, height // ph, width // pw, 1, ph, pw, -1)
        hidden_states = hidden_states.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, T, 1, h/2, 2, w/2, 2)
        velocity = hidden_states.flatten(6, 7).flatten(4, 5).flatten(2, 3)
        # a fresh tensor, not a view: FSDP2 hooks the root output for backward, and a view would let an
        # in-place op on it bypass that hook
        usage = gates.detach().float().mean(dim=(0, 1))  # (E,) share of the gates per expert
        return velocity.clone(), {"router_loss": router_loss, "expert_usage": usage}
