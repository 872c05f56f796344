"""A pure Euler flow sampler for one chunk, with Action-Free Guidance and optional text CFG.

Nothing here keeps state: the result is a function of (noise, sigmas, velocity function,
guidance scales), so one replica can interleave steps of many sessions safely — unlike diffusers'
schedulers, whose ``_step_index`` lives on the object.

Guidance branches, each a velocity of the same x_t:
  act   = v(actions, text)              always
  noact = v(null actions, text)         when action or text guidance is on
  null  = v(null actions, null text)    when text guidance is on
  v = null + s_text (noact - null) + s_act (act - noact)
With s_text = 1 this is Astra's AFG, v = noact + s_act (act - noact); with both at 1, v = act.
By default all needed branches run as one forward of batch (n_branches x B).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

BRANCHES = ("act", "noact", "null")

#: velocity_fn(x_t (nB, ...), sigma (nB,), branches: tuple of branch names, one per B-block) -> v
VelocityFn = Callable[[torch.Tensor, torch.Tensor, tuple[str, ...]], torch.Tensor]


@dataclass(frozen=True)
class Guidance:
    action_scale: float = 1.0
    text_scale: float = 1.0
    batch_branches: bool = True

    @property
    def branches(self) -> tuple[str, ...]:
        out = ["act"]
        if self.action_scale != 1.0 or self.text_scale != 1.0:
            out.append("noact")
        if self.text_scale != 1.0:
            out.append("null")
        return tuple(out)

    def combine(self, v: dict[str, torch.Tensor]) -> torch.Tensor:
        if len(v) == 1:
            return v["act"]
        out = v["noact"] + self.action_scale * (v["act"] - v["noact"])
        if "null" in v:
            out = out + (self.text_scale - 1.0) * (v["noact"] - v["null"])
        return out


def guided_velocity(
    velocity_fn: VelocityFn, x: torch.Tensor, sigma: torch.Tensor, guidance: Guidance
) -> torch.Tensor:
    """The guided velocity at x (B, ...) and sigma (B,)."""
    names = guidance.branches
    if guidance.batch_branches or len(names) == 1:
        n = len(names)
        v = velocity_fn(x.repeat(n, *([1] * (x.ndim - 1))), sigma.repeat(n), names)
        parts = dict(zip(names, v.chunk(n), strict=True))
    else:
        parts = {name: velocity_fn(x, sigma, (name,)) for name in names}
    return guidance.combine(parts)


def euler_sample(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    guidance: Guidance = Guidance(),
) -> torch.Tensor:
    """Integrate dx/dsigma = v from sigma = sigmas[0] (pure noise at 1) down to sigmas[-1] (0)."""
    x = noise.float()
    batch = x.shape[0]
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
        sigma = torch.full((batch,), s, dtype=torch.float32, device=x.device)
        v = guided_velocity(velocity_fn, x, sigma, guidance).float()
        x = x + (s_next - s) * v
    return x
