"""The action probe: does a model's first chunk depend on the actions the way the ground truth does?

A rollout's first sampling step sees pure noise (sigma = 1), so the model's x0 estimate there,
``noise - v``, is its guess of the first chunk from the start frame, the prompt and the actions
alone — the x_t of a later step already carries the layout and would leak it. The probe takes that
estimate for the commanded and every distractor action sequence of a case (one shared noise, the
row's action guidance) and compares how the estimates differ among themselves with how the
sequences' VAE-encoded ground truths differ:

- **direction**: each estimate's deviation from the estimates' mean is most similar (cosine) to
  its own truth's deviation from the truths' mean; chance = 1 / (K + 1). A model that ignores the
  actions (equal estimates) scores exactly chance.
- **response**: RMS of the estimates' deviations / RMS of the truths' deviations: 0 = the actions
  change nothing, 1 = they move the estimate as far as they move the truth.

One forward pass per case and row, no decoding: it tells in a second whether a model reads its
actions at all, where the rollout accuracy needs several chunks and a decode — and it separates
"ignores the actions" (response ~0) from "reads them but rolls out poorly".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from astra.config import AstraConfig
from astra.diffusion.sampler import Guidance, guided_velocity
from astra.model.framepack import concat_inputs
from astra.model.transformer import AstraTransformer
from astra.rollout.engine import branch_velocity_fn, check_actions, session_inputs
from astra.rollout.session import RolloutSession


@dataclass(frozen=True)
class ProbeScore:
    direction: float  # share of sequences whose estimate points to their own truth (chance 1/(K+1))
    response: float  # RMS deviation of the estimates over that of the truths


def probe_score(estimates: torch.Tensor, truths: torch.Tensor) -> ProbeScore:
    """estimates, truths: (S, ...) one per action sequence, same order."""
    dev_e = (estimates - estimates.mean(0, keepdim=True)).flatten(1).double()
    dev_t = (truths - truths.mean(0, keepdim=True)).flatten(1).double()
    cos = F.cosine_similarity(dev_e[:, None], dev_t[None], dim=-1)  # (estimate, truth); 0 for a zero row
    own = cos.argmax(1) == torch.arange(len(cos))  # a zero row picks index 0: chance over the case
    response = (dev_e.pow(2).mean() / dev_t.pow(2).mean().clamp(min=1e-12)).sqrt()
    return ProbeScore(float(own.double().mean()), float(response))


@torch.no_grad()
def probe(
    model: AstraTransformer,
    config: AstraConfig,
    session: RolloutSession,
    sequences: torch.Tensor,
    truths: torch.Tensor,
    seed: int,
) -> ProbeScore:
    """``session``: the case's start (its shared history latents); ``sequences`` (S, T, raw_dim) the first chunk's
    action rows of each sequence; ``truths`` (S, C, T, h, w) their ground-truth latents."""
    actions = [check_actions(a, session, config) for a in sequences]
    inputs = concat_inputs([session_inputs(session, a, config, model) for a in actions])
    # text guidance would need the null prompt's branch: the probe measures the action branch only
    guidance = Guidance(config.sampler.action_guidance, 1.0, config.sampler.batch_branches)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(truths.shape[1:], generator=generator).expand(len(actions), *truths.shape[1:])
    noise = noise.to(model.device)
    sigma = torch.ones(len(actions), device=model.device)
    velocity = guided_velocity(branch_velocity_fn(model, inputs), noise, sigma, guidance)
    return probe_score((noise - velocity).float().cpu(), truths.float())
