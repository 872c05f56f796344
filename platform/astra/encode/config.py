"""Configuration of the encode job (``jobs/encode.py --config encode.yaml key=value ...``)."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import Field, field_validator

from astra.config import PRESETS, ActionConfig, FrozenModel, TextEncoderConfig, VAEConfig, load_config
from astra.data.storage import StorageConfig

ENCODE_FORMAT_VERSION = 1


class VideoConfig(FrozenModel):
    """How clips are sampled: resolution (resize + centre crop), frame count and rate."""

    height: int = Field(480, ge=16, description="Output height in pixels (a multiple of 16).")
    width: int = Field(832, ge=16, description="Output width in pixels (a multiple of 16).")
    num_frames: int = Field(
        129,
        ge=1,
        description="Frames sampled per clip: 1 + 4k (the VAE's causal grouping); 129 = 33 latents.",
    )
    fps: float = Field(16.0, gt=0, description="Sampling rate of the frames (Wan: 16 fps).")

    @field_validator("num_frames")
    @classmethod
    def _one_plus_4k(cls, v: int) -> int:
        if (v - 1) % 4:
            raise ValueError(f"must be 1 + 4k (the VAE groups 4 frames per latent), got {v}")
        return v

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_16(cls, v: int) -> int:
        if v % 16:
            raise ValueError(f"must be a multiple of 16 (VAE 8x, patch 2x), got {v}")
        return v


class ComputeConfig(FrozenModel):
    decode_num_cpus: float = Field(1.0, gt=0, description="CPUs reserved by each PyAV decode task.")
    vae_actors: int = Field(
        1, ge=1, description="Size of the VAE actor pool (one per accelerator on a cluster)."
    )
    vae_num_gpus: float = Field(0.0, ge=0, description="GPUs per VAE actor (0 on a CPU box).")
    vae_num_cpus: float = Field(1.0, gt=0, description="CPUs per VAE actor.")
    vae_batch_size: int = Field(4, ge=1, description="Clips per VAE forward.")
    vae_dtype: Literal["float32", "bfloat16"] = Field("float32", description="VAE compute dtype.")
    text_batch_size: int = Field(16, ge=1, description="Clips per text-embedding call.")
    shard_size: int = Field(16, ge=1, description="Clips per latent shard written to the store.")


class EncodeConfig(FrozenModel):
    manifest: str = Field(
        description="Manifest of clips (JSONL or Parquet); relative uris are relative to it."
    )
    store: StorageConfig = Field(default_factory=StorageConfig, description="Where the latent store lives.")
    sources: StorageConfig | None = Field(
        None,
        description="S3 settings (s3_endpoint, s3_region) for s3:// clip and pose uris; None: the store's.",
    )
    video: VideoConfig = Field(default_factory=VideoConfig, description="Frame sampling and resolution.")
    vae: VAEConfig = Field(default_factory=VAEConfig, description="The VAE that encodes frames to latents.")
    text_encoder: TextEncoderConfig = Field(default_factory=TextEncoderConfig, description="Prompt encoder.")
    actions: ActionConfig = Field(default_factory=ActionConfig, description="Registered action modalities.")
    compute: ComputeConfig = Field(default_factory=ComputeConfig, description="Parallelism and batch sizes.")
    retry_quarantined: bool = Field(
        False, description="Retry clips quarantined by an earlier run of this config."
    )
    ray_address: str | None = Field(
        None, description="Ray cluster address; None: $RAY_ADDRESS or a local cluster."
    )
    progress_interval_s: float = Field(10.0, gt=0, description="Seconds between progress lines.")

    @property
    def source_storage(self) -> StorageConfig:
        return self.sources or self.store

    def encode_hash(self) -> str:
        """Hash of everything that shapes a stored clip: re-running with the same hash skips done clips."""
        key = {
            "version": ENCODE_FORMAT_VERSION,
            "video": self.video.model_dump(mode="json"),
            "vae": self.vae.model_dump(mode="json"),
            "text_encoder": self.text_encoder.model_dump(mode="json", include={"kind", "path", "max_length"}),
            "modalities": [m.model_dump(mode="json") for m in self.actions.modalities],
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


ENCODE_PRESETS: dict[str, dict[str, Any]] = {
    # the real resolution; the VAE comes from vae.pretrained_path, UMT5 from text_encoder.path
    "wan2.1-1.3b": {"text_encoder": {"kind": "umt5"}},
    # a laptop: 64x64, 17 frames (5 latents), the tiny VAE, MiniLM prompts
    "tiny": {
        "video": {"height": 64, "width": 64, "num_frames": 17, "fps": 16.0},
        "vae": PRESETS["tiny"]["vae"],
        "compute": {"vae_batch_size": 4, "shard_size": 8},
        "progress_interval_s": 2.0,
    },
}


def load_encode_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> EncodeConfig:
    return load_config(path, overrides, model_cls=EncodeConfig, presets=ENCODE_PRESETS)
