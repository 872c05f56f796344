"""HTTP schemas of the rollout API (``/v1``), and the error type both deployments use.

Frames travel as base64 JPEG. Actions come as exactly one of: per-latent action ``rows`` of the
session's modality, keyboard / mouse ``keys`` (camera) or ``drive`` commands (driving); a chunk is
``chunk_latents`` latent frames (``GET /v1/config``), i.e. 4 video frames each.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from astra.config import Solver
from astra.rollout.commands import DriveCommand, KeyCommand


class ApiError(Exception):
    """An error for the client: HTTP status + a message that starts with the field to fix."""

    def __init__(self, status: int, message: str):
        super().__init__(status, message)
        self.status, self.message = status, message

    def __reduce__(self):  # crosses the deployment boundary intact
        return ApiError, (self.status, self.message)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplerOptions(Strict):
    solver: Solver | None = Field(
        None, description="'euler' or 'unipc' (few-step: e.g. 8 steps); server default if unset."
    )
    num_steps: int | None = Field(None, ge=1, description="Solver steps per chunk (server default if unset).")
    action_guidance: float | None = Field(None, ge=0, description="AFG scale (server default if unset).")


class CreateSession(Strict):
    prompt: str = Field(..., min_length=1, description="What the world looks like.")
    modality: str = Field("camera", description="camera | driving | robot (what the model registers).")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="Seed of the session's noise.")
    image_base64: str | None = Field(None, description="Start image, PNG or JPEG, base64.")
    clip_base64: str | None = Field(None, description="Start clip (e.g. MP4), base64: its first 1+4k frames.")
    sampler: SamplerOptions = Field(default_factory=SamplerOptions, description="Sampling options.")


class SessionInfo(BaseModel):
    session_id: str
    step: int = Field(..., description="Chunks generated so far (the session's version).")
    modality: str
    latent_frames: int
    frames: int = Field(..., description="Video frames so far.")
    prompt: str | None
    seed: int
    sampler: dict
    created_at: float | None
    expires_at: float | None = Field(..., description="Unix time the session expires if idle.")
    forked_from: dict | None = Field(
        None, description="{session_id, step} of the session it was forked from."
    )


class CreateResponse(SessionInfo):
    start_frames: list[str] = Field(..., description="The decoded start frame(s), base64 JPEG.")


class StepRequest(Strict):
    rows: list[list[float]] | None = Field(
        None, description="One action row per latent frame of the chunk (the modality's raw_dim values)."
    )
    keys: list[KeyCommand] | None = Field(None, description="Keyboard / mouse commands (camera sessions).")
    drive: list[DriveCommand] | None = Field(None, description="Throttle / steer commands (driving).")
    expected_step: int | None = Field(
        None, ge=0, description="Refuse (409) unless the session is at this step (no forked history)."
    )
    stream: bool = Field(True, description="Server-sent events as frames are decoded; false: one JSON.")


class StepResponse(BaseModel):
    session: SessionInfo
    frames: list[str] = Field(..., description="The chunk's frames, base64 JPEG.")


class ForkRequest(Strict):
    step: int | None = Field(None, ge=0, description="Fork at this step (default: the current one).")


class ServiceInfo(BaseModel):
    model: str = Field(..., description="What is served: model.uri, or 'random' (a demo model).")
    modalities: list[str]
    chunk_latents: int = Field(..., description="Latent frames per chunk (each is 4 video frames).")
    raw_dims: dict[str, int]
    height: int
    width: int
    fps: float
    auth: bool
    limits: dict
