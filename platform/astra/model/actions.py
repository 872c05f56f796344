"""Action encoding: per-modality projectors, the router, and each block's Mixture of Action Experts.

One raw action row per latent frame (zero-padded to the widest modality) — normalised with the
modality's training statistics (``normalize``, buffers ``action_mean`` / ``action_std``) — plus its
history flag and, with ``presence_bit``, a 1/0 "this is a real action" input goes through its
modality's projector (Linear raw_dim+1(+1) -> unified_dim, shared by all blocks). Null rows (AFG,
action dropout, action-free clips) are all zeros, whatever the statistics.
A router turns the unified vector into expert gates once per forward (shared by all blocks, as the
reference's global router); each block's experts (Linear unified_dim -> dim) are mixed by those
gates. Routing is either *hard* (modality -> its registered expert, the reference code) or
*learned* (softmax top-k with a Switch-style load-balancing loss, as the paper describes).

Experts are zero-initialised, so a fresh model adds exactly nothing to the backbone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from astra.config import ActionConfig


class ActionEncoder(nn.Module):
    """Modality projectors + router. Output: unified vectors, expert gates and the router aux loss."""

    def __init__(self, cfg: ActionConfig):
        super().__init__()
        self.cfg = cfg
        extra = 2 if cfg.presence_bit else 1  # history flag (+ presence)
        self.projectors = nn.ModuleDict(
            {m.name: nn.Linear(m.raw_dim + extra, cfg.unified_dim) for m in cfg.modalities}
        )
        self.router = nn.Linear(cfg.unified_dim, cfg.num_experts) if cfg.routing == "learned" else None
        self._hard_expert = [m.expert for m in cfg.modalities]  # modality index -> expert index
        # per-modality statistics of the training data (identity until set_statistics); float32 always
        num, width = len(cfg.modalities), cfg.max_raw_dim
        self.register_buffer("action_mean", torch.zeros(num, width))
        self.register_buffer("action_std", torch.ones(num, width))
        self.register_buffer("action_count", torch.zeros(num, dtype=torch.long))  # rows behind them

    @torch.no_grad()
    def set_statistics(self, stats: dict, min_std: float = 1e-6) -> None:
        """Load per-modality ``ActionStats`` (from the store); dimensions that never vary are only
        centred (as ``astra.data.actions.normalise``). Modalities without statistics keep identity."""
        for i, spec in enumerate(self.cfg.modalities):
            s = stats.get(spec.name)
            if s is None or not s.count:
                continue
            mean = torch.as_tensor(s.mean, dtype=torch.float32)[: spec.raw_dim]
            std = torch.as_tensor(s.std, dtype=torch.float32)[: spec.raw_dim]
            self.action_mean[i].zero_()[: spec.raw_dim] = mean
            self.action_std[i].fill_(1.0)[: spec.raw_dim] = torch.where(
                std > min_std, std, torch.ones_like(std)
            )
            self.action_count[i] = int(s.count)

    def normalized(
        self, actions: torch.Tensor, modality: torch.Tensor, present: torch.Tensor
    ) -> torch.Tensor:
        """actions (B, R, A) raw -> model space: normalised (if configured), null rows zero."""
        if self.cfg.normalize:
            mean = self.action_mean.index_select(0, modality)[:, None]  # (B, 1, A)
            std = self.action_std.index_select(0, modality)[:, None]
            actions = (actions.float() - mean) / std
        return actions * present.unsqueeze(-1).to(actions.dtype)

    def project(
        self,
        actions: torch.Tensor,
        flags: torch.Tensor,
        modality: torch.Tensor,
        present: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """actions (B, R, A) raw rows, flags (B, R), modality (B,), present (B, R) 1 = real action
        (default all) -> unified (B, R, U).

        Every projector runs on every row and the sample's own modality is selected: no
        data-dependent branches (FSDP and compile friendly); the cost is a few tiny matmuls.
        """
        if present is None:
            present = torch.ones_like(flags)
        actions = self.normalized(actions, modality, present)
        inputs = (
            [flags.unsqueeze(-1), present.unsqueeze(-1)] if self.cfg.presence_bit else [flags.unsqueeze(-1)]
        )
        outs = []
        for spec in self.cfg.modalities:
            proj = self.projectors[spec.name]
            x = torch.cat([actions[..., : spec.raw_dim], *inputs], dim=-1).to(proj.weight.dtype)
            outs.append(proj(x))
        stacked = torch.stack(outs, dim=1)  # (B, M, R, U)
        pick = modality.view(-1, 1, 1, 1).expand(-1, 1, *stacked.shape[2:])
        return stacked.gather(1, pick).squeeze(1)

    def route(self, unified: torch.Tensor, modality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """unified (B, R, U) -> gates (B, R, E) (zeros except the chosen experts), aux loss (scalar)."""
        num_experts = self.cfg.num_experts
        if self.router is None:
            table = torch.tensor(self._hard_expert, dtype=torch.long, device=modality.device)
            expert = table[modality]  # (B,)
            gates = (
                F.one_hot(expert, num_experts).to(unified.dtype)[:, None, :].expand(-1, unified.shape[1], -1)
            )
            return gates, unified.new_zeros(())
        logits = self.router(unified).float()  # (B, R, E)
        probs = logits.softmax(-1)
        top_w, top_i = probs.topk(self.cfg.top_k, dim=-1)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        gates = torch.zeros_like(probs).scatter(-1, top_i, top_w)
        # Switch-Transformer load balancing: E * sum_e (share of assignments to e) * (mean prob of e).
        assigned = F.one_hot(top_i, num_experts).float().sum(-2).flatten(0, -2).mean(0) / self.cfg.top_k
        mean_prob = probs.flatten(0, -2).mean(0)
        aux = num_experts * (assigned * mean_prob).sum()
        return gates.to(unified.dtype), aux

    def forward(
        self,
        actions: torch.Tensor,
        flags: torch.Tensor,
        modality: torch.Tensor,
        present: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        unified = self.project(actions, flags, modality, present)
        gates, aux = self.route(unified, modality)
        return unified, gates, aux


class ActionExperts(nn.Module):
    """One block's experts: gates-weighted sum of Linear(unified_dim -> dim) experts."""

    def __init__(self, unified_dim: int, dim: int, num_experts: int):
        super().__init__()
        self.experts = nn.ModuleList([nn.Linear(unified_dim, dim) for _ in range(num_experts)])

    def reset_parameters(self) -> None:
        """Zero init: the block starts as the pretrained block (DiT's zero-init conditioning)."""
        for e in self.experts:
            nn.init.zeros_(e.weight)
            nn.init.zeros_(e.bias)

    def forward(self, unified: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """unified (B, R, U), gates (B, R, E) -> (B, R, D). Dense over experts: E is small (4) and
        R is the number of latent frames in the chunk (~30), so this is negligible next to attention."""
        weight = torch.stack([e.weight for e in self.experts])  # (E, D, U)
        bias = torch.stack([e.bias for e in self.experts])  # (E, D)
        unified = unified.to(weight.dtype)
        per_expert = torch.einsum("bru,edu->bred", unified, weight) + bias  # (B, R, E, D)
        return torch.einsum("bre,bred->brd", gates.to(weight.dtype), per_expert)
