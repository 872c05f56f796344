"""Flow samplers for one chunk, with Action-Free Guidance and optional text CFG.

``sample`` integrates one chunk with the configured solver: ``euler`` (the reference's, written out:
one velocity per step) or ``unipc`` (diffusers' ``UniPCMultistepScheduler`` in its flow-matching mode,
the solver Wan-2.1's own pipelines use: a multistep predictor-corrector that needs far fewer steps).
Nothing outlives a call: the result is a function of (noise, steps, shift, velocity function, guidance
scales), so one replica can interleave chunks of many sessions safely. A diffusers scheduler keeps its
step index and past outputs on the object, so each call builds its own and drops it afterwards.

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


def unipc_sample(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    num_steps: int,
    shift: float,
    guidance: Guidance = Guidance(),
    order: int = 2,
) -> torch.Tensor:
    """UniPC on the same shifted sigma grid as ``euler_sample`` (diffusers nudges its first sigma
    from 1 to 1 - 1e-6). The scheduler is this call's own: no state is shared between chunks."""
    import numpy as np
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift, solver_order=order
    )
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, num_steps + 1)[:-1], device=noise.device)
    x = noise.float()
    batch = x.shape[0]
    for i, t in enumerate(scheduler.timesteps):
        sigma = torch.full((batch,), float(scheduler.sigmas[i]), dtype=torch.float32, device=x.device)
        v = guided_velocity(velocity_fn, x, sigma, guidance).float()
        x = scheduler.step(v, t, x, return_dict=False)[0]
    return x


def sample(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    solver: str,
    num_steps: int,
    shift: float,
    guidance: Guidance,
) -> torch.Tensor:
    """One chunk from pure noise with ``solver`` ('euler' | 'unipc') in ``num_steps`` steps."""
    if solver == "unipc":
        return unipc_sample(velocity_fn, noise, num_steps, shift, guidance)
    from astra.diffusion.flow import sampling_sigmas

    return euler_sample(velocity_fn, noise, sampling_sigmas(num_steps, shift), guidance)
