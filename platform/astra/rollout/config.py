"""Configuration of the rollout service (``serving/``: ``serve run serving.app:app``, or
``serve deploy infra/serve_config.yaml`` with these fields as the application's ``args``).

The model side (architecture, VAE, sampler defaults) is the library's ``AstraConfig`` under ``astra``;
the service adds where the weights come from, the text encoder, the video size, where sessions live,
limits on what a request may ask, and how replicas scale. Presets: ``tiny`` (a random or trained
tiny model on a laptop) and ``wan2.1-1.3b``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from astra.config import PRESETS, AstraConfig, TextEncoderConfig, build_config, load_config, multiple_of_16
from astra.config_base import FrozenModel, deep_merge, load_config_tree, parse_overrides
from astra.data.storage import StorageConfig
from astra.rollout.commands import CommandConfig


class ModelSource(FrozenModel):
    """Where the served weights come from."""

    uri: str | None = Field(
        None,
        description="An Astra checkpoint folder (local or s3://, full or adapter-only) or an MLflow model "
        "URI models:/NAME/VERSION as the training job registers it; None: a random model of `astra.model` "
        "(demos and tests only: it generates noise).",
    )
    base: str | None = Field(
        None,
        description="Base Wan weights for an adapter-only checkpoint: a diffusers folder (local or s3://); "
        "None: a random backbone seeded with base_seed (what the tiny training preset starts from).",
    )
    base_seed: int = Field(0, description="Seed of a random base backbone (the training job's init.seed).")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI for models:/ URIs.")
    s3_endpoint: str | None = Field(None, description="S3-compatible endpoint for s3:// weights.")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Weights and compute dtype.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the transformer runs; 'auto': the replica's GPU when it has one, else CPU."
    )
    cache_dir: str = Field(
        "runs/serve-cache", description="Where downloaded weights (s3://, models:/) are kept on a replica."
    )


class LimitsConfig(FrozenModel):
    """What one request, one replica and the whole service accept (beyond them: a 4xx naming the limit)."""

    max_body_bytes: int = Field(16 * 2**20, ge=1024, description="Largest request body.")
    max_image_pixels: int = Field(
        4096 * 4096, ge=64, description="Largest start image (width x height), checked before decoding it."
    )
    max_clip_frames: int = Field(161, ge=1, description="Longest start clip, in frames.")
    max_prompt_chars: int = Field(2000, ge=1, description="Longest prompt text.")
    max_commands: int = Field(64, ge=1, description="Most commands in one step.")
    max_steps: int = Field(1000, ge=1, description="Most chunks one session may generate.")
    max_sampler_steps: int = Field(100, ge=1, description="Largest sampler.num_steps a session may ask for.")
    max_guidance: float = Field(10.0, gt=0, description="Largest action_guidance a session may ask for.")
    sessions_per_replica: int = Field(
        8,
        ge=1,
        description="Sessions a replica keeps in memory (with their decoder caches); older ones "
        "are dropped from memory (their state is in the session store) and reloaded when used.",
    )
    max_sessions: int = Field(1000, ge=1, description="Live sessions in the store, all replicas together.")


class ReplicaConfig(FrozenModel):
    """The chunk-generation deployment: resources, autoscaling, batching."""

    num_cpus: float = Field(1.0, gt=0, description="CPUs per replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (0: CPU).")
    min_replicas: int = Field(1, ge=0, description="Autoscaling lower bound.")
    max_replicas: int = Field(2, ge=1, description="Autoscaling upper bound.")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at start; None: min_replicas.")
    target_ongoing_requests: float = Field(2.0, gt=0, description="Autoscaling target per replica.")
    upscale_delay_s: float = Field(30.0, ge=0, description="Load must last this long before a scale-up.")
    downscale_delay_s: float = Field(600.0, ge=0, description="Idle this long before a scale-down.")
    look_back_period_s: float = Field(30.0, gt=0, description="Window the autoscaler averages load over.")
    max_ongoing_requests: int = Field(8, ge=1, description="Requests a replica takes at once.")
    max_batch_size: int = Field(4, ge=1, description="Steps of different sessions denoised together.")
    batch_wait_timeout_s: float = Field(0.02, ge=0, description="How long a batch waits to fill.")
    ingress_replicas: int = Field(1, ge=1, description="HTTP ingress replicas.")

    @model_validator(mode="after")
    def _bounds(self) -> ReplicaConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) < min_replicas ({self.min_replicas})")
        return self


class ServeConfig(FrozenModel):
    astra: AstraConfig = Field(default_factory=AstraConfig, description="Model architecture, VAE, sampler.")
    model: ModelSource = Field(default_factory=ModelSource, description="Served weights.")
    text_encoder: TextEncoderConfig = Field(default_factory=TextEncoderConfig, description="Prompt encoder.")
    height: int = Field(480, ge=16, description="Video height in pixels (start images are resized to it).")
    width: int = Field(832, ge=16, description="Video width in pixels.")
    fps: float = Field(16.0, gt=0, description="Frame rate of the returned video.")
    sessions: StorageConfig = Field(
        default_factory=lambda: StorageConfig(uri="runs/sessions"), description="The session store."
    )
    session_ttl_s: float = Field(1800.0, gt=0, description="Idle time after which a session expires.")
    auth_token: str | None = Field(
        None,
        description="Bearer token every /v1 request must carry; None: $ASTRA_SERVE_TOKEN if set, else "
        "no authentication.",
    )
    jpeg_quality: int = Field(85, ge=10, le=100, description="Quality of streamed JPEG frames.")
    commands: CommandConfig = Field(default_factory=CommandConfig, description="Keyboard / driving commands.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Request and session limits.")
    replicas: ReplicaConfig = Field(default_factory=ReplicaConfig, description="Scaling and batching.")

    _multiple_of_16 = field_validator("height", "width")(multiple_of_16)


SERVE_PRESETS: dict[str, dict[str, Any]] = {
    "wan2.1-1.3b": {
        "astra": PRESETS["wan2.1-1.3b"],
        "text_encoder": {"kind": "umt5"},
        "model": {"dtype": "bfloat16"},
        "replicas": {"num_gpus": 1.0, "max_batch_size": 2},
    },
    "tiny": {
        "astra": PRESETS["tiny"],
        "height": 64,
        "width": 64,
        "replicas": {"num_cpus": 0.5},
    },
}


SERVE_PRESETS["demo"] = {**SERVE_PRESETS["tiny"], "astra": PRESETS["demo"]}


def load_serve_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ServeConfig:
    return load_config(path, overrides, model_cls=ServeConfig, presets=SERVE_PRESETS)


def serve_config_from_args(args: dict[str, Any]) -> ServeConfig:
    """A Serve application's ``args`` as a config: ``serve run serving.app:build key=value ...`` gives
    dotted string keys, a Serve config file's ``args:`` a nested mapping; ``config`` names a YAML file.
    With no preset anywhere the tiny one applies."""
    args = dict(args)
    path = args.pop("config", None)
    data: dict[str, Any] = {}
    if path is not None:
        data = load_config_tree(path)
    nested = {k: v for k, v in args.items() if "." not in k}
    dotted = [f"{k}={v}" for k, v in args.items() if "." in k]
    data = deep_merge(deep_merge(data, nested), parse_overrides(dotted))
    data.setdefault("preset", "tiny")
    return build_config(data, ServeConfig, SERVE_PRESETS)
