"""The chunk engine: one autoregressive step of one or more rollout sessions.

For each session: plan the FramePack history for its current length, gather history latents and
action rows, draw the chunk's noise from the session's own generator, run the pure Euler sampler
with Action-Free Guidance (the guidance branches share one batched forward), and return the next
version of the session with the chunk appended. Sessions whose windows have the same group sizes
(any two sessions once their windows are full) are generated in one batch.
"""

from __future__ import annotations

import torch

from astra.config import AstraConfig
from astra.diffusion.flow import timestep_from_sigma
from astra.diffusion.sampler import Guidance, VelocityFn, sample
from astra.model.framepack import ChunkInputs, concat_inputs, pack_chunk, plan_chunk
from astra.model.text import pad_context
from astra.model.transformer import AstraTransformer, TokenLayout
from astra.rollout.session import RolloutSession


def check_actions(actions: torch.Tensor, session: RolloutSession, config: AstraConfig) -> torch.Tensor:
    """Validate one chunk of actions: (target_frames, raw_dim of the session's modality), finite."""
    spec = config.model.actions.modality(session.modality)
    want = (config.model.framepack.target_frames, spec.raw_dim)
    actions = torch.as_tensor(actions, dtype=torch.float32)
    if tuple(actions.shape) != want:
        raise ValueError(
            f"actions: expected shape {want} (model.framepack.target_frames x {spec.name} raw_dim), "
            f"got {tuple(actions.shape)}"
        )
    if not torch.isfinite(actions).all():
        raise ValueError("actions: contains NaN or infinite values")
    return actions


def session_inputs(
    session: RolloutSession, actions: torch.Tensor, config: AstraConfig, model: AstraTransformer
) -> ChunkInputs:
    """Packed inputs (batch 1) for the session's next chunk, on the model's device and dtype."""
    acfg = config.model.actions
    plan = plan_chunk(session.num_frames, config.model.framepack)
    rows = torch.cat([session.actions, actions], dim=0)  # (F + T, raw_dim)
    rows = torch.nn.functional.pad(rows, (0, acfg.max_raw_dim - rows.shape[1]))  # (F + T, A)
    inputs = pack_chunk(
        plan,
        session.history[None],
        rows[None],
        pad_context([session.prompt], config.model.context_length),  # as training pads it
        torch.tensor([acfg.modality_id(session.modality)]),
    )
    return inputs.to(model.device, model.dtype)


def branch_velocity_fn(
    model: AstraTransformer, inputs: ChunkInputs, null_context: torch.Tensor | None = None
) -> VelocityFn:
    """The model as the sampler sees it: velocity of x_t for a tuple of guidance branches."""
    variants = {"act": inputs, "noact": inputs.without_actions()}
    if null_context is not None:
        variants["null"] = ChunkInputs(
            context=null_context,
            modality=inputs.modality,
            history=variants["noact"].history,
            target=variants["noact"].target,
        )
    # per branch combination: the batched inputs and their token layout, built once per chunk
    cache: dict[tuple[str, ...], tuple[ChunkInputs, TokenLayout]] = {}

    def velocity(x: torch.Tensor, sigma: torch.Tensor, branches: tuple[str, ...]) -> torch.Tensor:
        if branches not in cache:
            if "null" in branches and "null" not in variants:
                raise ValueError("sampler.text_guidance != 1 needs a null prompt embedding in the session")
            batched = concat_inputs([variants[b] for b in branches])
            cache[branches] = (batched, model.token_layout(batched, tuple(x.shape[-2:]), x.shape[2]))
        batched, layout = cache[branches]
        t = timestep_from_sigma(sigma).to(model.device)
        v, _ = model(x.to(model.device, model.dtype), t, batched, layout)
        return v.float()

    return velocity


@torch.no_grad()
def generate_chunks(
    model: AstraTransformer,
    sessions: list[RolloutSession],
    actions: list[torch.Tensor],
    config: AstraConfig,
) -> tuple[list[RolloutSession], torch.Tensor]:
    """Generate the next chunk of every session in one batch.

    actions: per session, (target_frames, raw_dim). Returns the advanced sessions and the chunks
    (B, C, T, h, w) of normalised latents. Raises ValueError if the sessions' FramePack windows
    differ in shape (callers group sessions by ``plan_chunk(...)`` group sizes).
    """
    if len(sessions) != len(actions):
        raise ValueError(f"got {len(sessions)} sessions but {len(actions)} action chunks")
    actions = [check_actions(a, s, config) for s, a in zip(sessions, actions, strict=True)]
    parts = [session_inputs(s, a, config, model) for s, a in zip(sessions, actions, strict=True)]
    inputs = concat_inputs(parts)
    null = None
    if config.sampler.text_guidance != 1.0:
        if any(s.null_prompt is None for s in sessions):
            raise ValueError("sampler.text_guidance != 1 needs a null prompt embedding in every session")
        null = pad_context([s.null_prompt for s in sessions], config.model.context_length)
        null = null.to(model.device, model.dtype)

    # noise from each session's own generator: a session's chunk does not depend on its batch-mates
    generators = [s.generator() for s in sessions]
    channels, (height, width) = sessions[0].history.shape[0], sessions[0].history.shape[2:]
    shape = (channels, config.model.framepack.target_frames, height, width)
    noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(model.device)

    scfg = config.sampler
    guidance = Guidance(scfg.action_guidance, scfg.text_guidance, scfg.batch_branches)
    velocity = branch_velocity_fn(model, inputs, null)
    chunks = sample(velocity, noise, scfg.solver, scfg.num_steps, scfg.shift, guidance).cpu()
    advanced = [s.advanced(c, a, g) for s, c, a, g in zip(sessions, chunks, actions, generators, strict=True)]
    return advanced, chunks


def generate_chunk(
    model: AstraTransformer, session: RolloutSession, actions: torch.Tensor, config: AstraConfig
) -> tuple[RolloutSession, torch.Tensor]:
    """One session's next chunk: (advanced session, chunk (C, T, h, w))."""
    sessions, chunks = generate_chunks(model, [session], [actions], config)
    return sessions[0], chunks[0]
