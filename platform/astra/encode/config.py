"""Configuration of the encode job (``jobs/encode.py --config encode.yaml key=value ...``)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from astra.config import (
    PRESETS,
    ActionConfig,
    ConfigError,
    FrozenModel,
    TextEncoderConfig,
    VAEConfig,
    load_config,
    multiple_of_16,
)
from astra.data.manifest import manifest_exists
from astra.data.storage import StorageConfig
from astra.runtime import RayConfig, job_working_dir, resolve_local

# 2: clips stored whole / in windows (min..max frames), action-free clips, latent dtype
ENCODE_FORMAT_VERSION = 2


def _one_plus_4k(v: int) -> int:
    if (v - 1) % 4:
        raise ValueError(f"must be 1 + 4k (the VAE groups 4 frames per latent), got {v}")
    return v


class VideoConfig(FrozenModel):
    """How clips are sampled: resolution (resize + centre crop), frame rate, and how much of each clip.

    A clip is stored whole up to ``max_frames``; a longer one as consecutive windows of ``max_frames``
    (each window starts on the previous one's last frame), at most ``max_windows`` of them; the final
    window is the longest 1 + 4k the rest gives, kept if it has ``min_frames``. A clip shorter than
    ``min_frames`` is quarantined."""

    height: int = Field(480, ge=16, description="Output height in pixels (a multiple of 16).")
    width: int = Field(832, ge=16, description="Output width in pixels (a multiple of 16).")
    fps: float = Field(16.0, gt=0, description="Sampling rate of the frames (Wan: 16 fps).")
    max_frames: int = Field(
        161,
        ge=1,
        description="Frames per stored clip or window, 1 + 4k: 161 = 41 latents (10 s at 16 fps), room "
        "for the paper's longest history (32 latents) plus an 8-latent target.",
    )
    min_frames: int = Field(
        33,
        ge=1,
        description="Shortest clip (or final window) kept, 1 + 4k: 33 = 9 latents, one history latent "
        "plus an 8-latent target. Shorter clips are quarantined.",
    )
    max_windows: int = Field(
        16, ge=1, description="Most windows stored per clip (1: only the start of a long clip)."
    )

    @field_validator("max_frames", "min_frames")
    @classmethod
    def _frames(cls, v: int) -> int:
        return _one_plus_4k(v)

    _multiple_of_16 = field_validator("height", "width")(multiple_of_16)

    @model_validator(mode="after")
    def _min_le_max(self) -> VideoConfig:
        if self.min_frames > self.max_frames:
            raise ValueError(f"min_frames ({self.min_frames}) must not exceed max_frames ({self.max_frames})")
        return self


class ComputeConfig(FrozenModel):
    """Parallelism of the pipeline. ``None`` fields are sized to the cluster the job finds."""

    decode_num_cpus: float = Field(1.0, gt=0, description="CPUs reserved by each PyAV decode task.")
    decode_timeout_s: float | None = Field(
        900.0,
        gt=0,
        description="Seconds a clip's read + decode may take per window before the clip is quarantined "
        "('timed out'): a hanging read (stalled mount) must not hold a decode slot forever. None: no limit.",
    )
    vae_actors: int | None = Field(
        None,
        ge=1,
        description="VAE actor pool size; None: one per GPU the cluster has (vae_num_gpus each), 1 on "
        "a CPU-only cluster.",
    )
    vae_num_gpus: float = Field(0.0, ge=0, description="GPUs per VAE actor (0 on a CPU box).")
    vae_num_cpus: float | None = Field(
        None,
        gt=0,
        description="CPUs per VAE actor; None: 1, or less on a small cluster so that one decode task "
        "always fits beside the actors.",
    )
    vae_batch_size: int = Field(4, ge=1, description="Clips per VAE forward (equal lengths batch together).")
    vae_dtype: Literal["float32", "bfloat16"] = Field("float32", description="VAE compute dtype.")
    text_batch_size: int = Field(16, ge=1, description="Clips per text-embedding call.")
    shard_size: int = Field(16, ge=1, description="Clips per latent shard written to the store.")
    fit_to_cluster: bool = Field(
        True,
        description="Check the pipeline fits the cluster's resources at start (fail at once if not) and "
        "size the None fields to it. False on an autoscaling cluster that adds nodes on demand.",
    )


class WatchdogConfig(FrozenModel):
    """What the job does when no clip finishes for a while."""

    warn_after_s: float = Field(
        120.0, gt=0, description="Seconds without a finished clip before the job says what is starved."
    )
    fail_after_s: float | None = Field(
        None, gt=0, description="Seconds without a finished clip before the job gives up (None: never)."
    )


class EncodeConfig(FrozenModel):
    manifest: str = Field(
        description="Manifest of clips (JSONL or Parquet; local path or s3://); relative clip uris are "
        "relative to it."
    )
    store: StorageConfig = Field(default_factory=StorageConfig, description="Where the latent store lives.")
    sources: StorageConfig | None = Field(
        None,
        description="S3 settings (s3_endpoint, s3_region) for s3:// manifests, clips and poses; None: "
        "the store's.",
    )
    video: VideoConfig = Field(default_factory=VideoConfig, description="Frame sampling and resolution.")
    latent_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Dtype of the stored latents (bfloat16 halves the store)."
    )
    require_poses: tuple[str, ...] = Field(
        (),
        description="Modalities whose clips must have poses: such a record without poses_uri is "
        "quarantined before any decoding. Clips of other modalities without poses are stored "
        "action-free (no action rows; training uses them as plain video / null actions).",
    )
    vae: VAEConfig = Field(default_factory=VAEConfig, description="The VAE that encodes frames to latents.")
    text_encoder: TextEncoderConfig = Field(default_factory=TextEncoderConfig, description="Prompt encoder.")
    actions: ActionConfig = Field(default_factory=ActionConfig, description="Registered action modalities.")
    compute: ComputeConfig = Field(default_factory=ComputeConfig, description="Parallelism and batch sizes.")
    retry_quarantined: bool = Field(
        False, description="Retry clips quarantined by an earlier run of this config."
    )
    ray: RayConfig = Field(default_factory=RayConfig, description="Which Ray cluster runs the job, and how.")
    progress_interval_s: float = Field(10.0, gt=0, description="Seconds between progress lines.")
    watchdog: WatchdogConfig = Field(
        default_factory=WatchdogConfig, description="No-progress detection: warn, then optionally fail."
    )
    vae_files: str | None = Field(
        None,
        description="Filled in by the job at start, not a setting: the names, sizes and modification "
        "times of a local vae.pretrained_path's files, part of the encode hash — new weights in the same "
        "folder re-encode every clip instead of mixing latents of two VAEs in one store.",
    )

    @model_validator(mode="after")
    def _known_modalities(self) -> EncodeConfig:
        names = [m.name for m in self.actions.modalities]
        unknown = [m for m in self.require_poses if m not in names]
        if unknown:
            raise ValueError(f"require_poses: unknown modalities {unknown}; registered: {names}")
        return self

    @property
    def source_storage(self) -> StorageConfig:
        return self.sources or self.store

    def encode_hash(self) -> str:
        """Hash of everything that shapes a stored clip: re-running with the same hash skips done clips."""
        key = {
            "version": ENCODE_FORMAT_VERSION,
            "video": self.video.model_dump(mode="json"),
            "latent_dtype": self.latent_dtype,
            "vae": self.vae.model_dump(mode="json"),
            **({"vae_files": self.vae_files} if self.vae_files is not None else {}),  # old hashes stay
            "vae_dtype": self.compute.vae_dtype,
            "text_encoder": self.text_encoder.model_dump(mode="json", include={"kind", "path", "max_length"}),
            "modalities": [m.model_dump(mode="json") for m in self.actions.modalities],
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


ENCODE_PRESETS: dict[str, dict[str, Any]] = {
    # the real resolution; the VAE comes from vae.pretrained_path, UMT5 from text_encoder.path
    "wan2.1-1.3b": {"text_encoder": {"kind": "umt5"}, "compute": {"vae_num_gpus": 1.0, "vae_batch_size": 1}},
    # a laptop: 64x64, clips of 9..33 frames (3..9 latents), the tiny VAE, MiniLM prompts
    "tiny": {
        "video": {"height": 64, "width": 64, "fps": 16.0, "max_frames": 33, "min_frames": 9},
        "vae": PRESETS["tiny"]["vae"],
        "compute": {"vae_batch_size": 4, "shard_size": 8},
        "progress_interval_s": 2.0,
        "watchdog": {"warn_after_s": 60.0},
    },
}


# the demo world: as tiny, with the demo VAE (its trained weights come in vae.pretrained_path)
ENCODE_PRESETS["demo"] = {
    **ENCODE_PRESETS["tiny"],
    "vae": PRESETS["demo"]["vae"],
    "watchdog": {"warn_after_s": 180.0},
}


def load_encode_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> EncodeConfig:
    return load_config(path, overrides, model_cls=EncodeConfig, presets=ENCODE_PRESETS)


def resolve_paths(config: EncodeConfig) -> EncodeConfig:
    """Before any cluster starts: manifest and store as absolute paths (or s3://), the manifest there.

    Raises ConfigError naming the field: a missing manifest, or a relative path inside a submitted
    job's temporary working dir (see ``astra.runtime.resolve_local``)."""
    manifest = resolve_local("manifest", config.manifest)
    store = resolve_local("store.uri", config.store.uri)
    try:
        found = manifest_exists(manifest, config.source_storage)
    except (OSError, ValueError) as err:
        raise ConfigError(f"manifest: cannot read {manifest}: {err}") from None
    if not found:
        hint = ""
        if job_working_dir() is not None and "://" not in manifest:
            hint = (
                " (on the machine running this Ray job: a path on the submitting machine is not "
                "uploaded; use storage every node sees, or an s3:// uri)"
            )
        raise ConfigError(f"manifest: file not found: {manifest}{hint}")
    data = config.model_dump()
    data["manifest"], data["store"]["uri"] = manifest, store
    data["vae_files"] = _files_of(config.vae.pretrained_path)
    return EncodeConfig.model_validate(data)


def _files_of(path: str | None) -> str | None:
    """The files of a local weights folder (or file) as (name, size, mtime) lines; None for none or s3://
    (an object store's weights are named by their path alone)."""
    if path is None or "://" in path or not os.path.exists(path):
        return None
    root = Path(path)
    files = sorted(p for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file())
    return "\n".join(f"{p.relative_to(root) if p != root else p.name} {p.stat().st_size} {p.stat().st_mtime_ns}"
                     for p in files)  # fmt: skip
