"""Configuration of the training job (``jobs/train.py --config train.yaml key=value ...``).

The model side (architecture, actions, FramePack layout, diffusion objective, sampler for the sample
rollouts) is the library's ``AstraConfig``, embedded whole under ``astra``; everything a training run
adds lives beside it: data (the latent store, mixing, history lengths), optimisation, parallelism,
checkpoints, evaluation and tracking. Presets: ``tiny`` (a laptop) and ``wan2.1-1.3b`` (the paper).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from astra.config import PRESETS, AstraConfig, ConfigError, FrozenModel, load_config
from astra.data.storage import StorageConfig, resolve
from astra.model.trainable import BACKBONE_PATTERNS, TRAINABLE_PATTERNS
from astra.runtime import RayConfig, resolve_local


class HistoryConfig(FrozenModel):
    """How many history latents a training sample has (the reference: 40% one latent, 50% uniform
    over 2..max, 10% max), where max = ``max_latents`` capped by the clip."""

    p_single: float = Field(
        0.4, ge=0, le=1, description="Probability of a single history latent (image start)."
    )
    p_uniform: float = Field(0.5, ge=0, le=1, description="Probability of a length uniform over 2..max.")
    p_max: float = Field(0.1, ge=0, le=1, description="Probability of the longest history the clip allows.")
    max_latents: int | None = Field(
        None,
        ge=1,
        description="Longest history drawn; None: the FramePack window (anchor + recent + 2x + 4x). Longer "
        "histories slide the window (and the anchor's RoPE place) exactly as a long rollout does.",
    )

    @model_validator(mode="after")
    def _sums_to_one(self) -> HistoryConfig:
        total = self.p_single + self.p_uniform + self.p_max
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"p_single + p_uniform + p_max must be 1, got {total:g}")
        return self


class DataConfig(FrozenModel):
    """Where samples come from and how they are drawn."""

    store: StorageConfig = Field(default_factory=StorageConfig, description="The latent store encode wrote.")
    encode_hash: str | None = Field(
        None, description="Which encode generation of the store to train on; None: the store's only one."
    )
    weights: dict[str, float] = Field(
        default_factory=dict,
        description="Sampling weight per dataset or modality name (a clip takes the product of its "
        "dataset's and its modality's weight; unnamed ones weigh 1; 0 leaves them out).",
    )
    history: HistoryConfig = Field(default_factory=HistoryConfig, description="History-length distribution.")
    target_latents: int | None = Field(
        None, ge=1, description="Latents to predict per sample; None: model.framepack.target_frames."
    )
    val_clips: int = Field(
        8, ge=0, description="Clips held out for validation, chosen by a hash of their id (deterministic)."
    )
    shuffle_buffer: int = Field(256, ge=1, description="Samples mixed before batching (per worker).")
    cache_bytes: int = Field(
        1 << 30,
        ge=0,
        description="Keep a worker's training clips in memory after its first pass over the store when "
        "their latents and actions take at most this many bytes; later epochs replay them from memory "
        "(the same stream, bitwise) instead of restarting a Ray Data read. 0: always stream.",
    )

    @field_validator("weights")
    @classmethod
    def _non_negative(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: w for k, w in v.items() if w < 0}
        if bad:
            raise ValueError(f"weights must be >= 0, got {bad}")
        return v


class OptimConfig(FrozenModel):
    """AdamW over the trainable whitelist, with warm-up and decay."""

    lr: float = Field(1e-5, gt=0, description="Peak learning rate (the paper: 1e-5).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decoupled weight decay.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    warmup_steps: int = Field(100, ge=0, description="Linear warm-up from 0 to lr.")
    decay: Literal["constant", "cosine", "linear"] = Field(
        "cosine", description="Decay after warm-up, to min_lr_ratio x lr at max_steps."
    )
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final lr as a fraction of the peak.")
    grad_clip: float | None = Field(
        1.0, gt=0, description="Clip the global gradient norm to this; None: off."
    )
    lr_scale: dict[str, float] = Field(
        default_factory=dict,
        description="Learning-rate multipliers by parameter: a regex searched in the parameter's name -> "
        "factor (the first matching entry wins; others train at 1x). E.g. {'moe|action_encoder': 10}: the "
        "new, zero-initialised action pathway learns faster than the pretrained weights it steers.",
    )

    @field_validator("lr_scale")
    @classmethod
    def _patterns(cls, v: dict[str, float]) -> dict[str, float]:
        for pattern, factor in v.items():
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{pattern!r} is not a regex: {e}") from None
            if not factor > 0:
                raise ValueError(f"{pattern!r}: the factor must be > 0, got {factor}")
        return v


class ParallelConfig(FrozenModel):
    """Workers and how the model is sharded over them."""

    workers: int = Field(1, ge=1, description="Ray Train workers (one per accelerator).")
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL); False: CPU workers (gloo).")
    cpus_per_worker: float | None = Field(
        None,
        gt=0,
        description="CPUs reserved per worker; None: 1, or less on a small cluster so that every worker fits.",
    )
    fit_to_cluster: bool = Field(
        True,
        description="Check the workers fit the cluster's CPUs / GPUs at start (fail at once, naming the "
        "setting, if not). False on an autoscaling cluster that adds GPU nodes on demand: the workers' "
        "request then waits for the autoscaler.",
    )
    fsdp: bool = Field(True, description="FSDP2 fully_shard per block and at the root (False: replicate).")
    param_dtype: Literal["bfloat16", "float32"] = Field(
        "bfloat16", description="Compute dtype of the sharded parameters (master weights stay float32)."
    )
    reduce_dtype: Literal["float32", "bfloat16"] = Field("float32", description="Gradient reduction dtype.")
    reshard_after_forward: bool = Field(
        True, description="Free gathered parameters after each block's forward (less memory, more comms)."
    )
    activation_checkpointing: bool = Field(
        True, description="Recompute each block's activations in backward."
    )
    peak_tflops: float | None = Field(
        None,
        gt=0,
        description="Peak TFLOP/s of one accelerator, for MFU; None: known GPUs by name (H100, A100, ...), "
        "no MFU on others (CPUs).",
    )
    max_failures: int = Field(
        3, ge=0, description="Worker-group restarts from the last checkpoint after a worker dies."
    )


class CheckpointConfig(FrozenModel):
    """Sharded checkpoints (torch.distributed.checkpoint) reported to Ray Train."""

    every_steps: int = Field(500, ge=1, description="Steps between checkpoints (and at the end).")
    keep_last: int = Field(3, ge=1, description="Checkpoints kept (older ones are deleted by Ray Train).")


class TrackingConfig(FrozenModel):
    """MLflow."""

    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI; None: sqlite:///<storage_path>/<run_name>/mlflow.db (local, "
        "`mlflow ui`).",
    )
    experiment: str = Field("astra", description="MLflow experiment name.")
    register_as: str | None = Field(
        "astra-adapter", description="Registered model name of the exported adapter; None: not registered."
    )


class InitConfig(FrozenModel):
    """Where the starting weights come from."""

    kind: Literal["random", "wan", "wan_original", "astra"] = Field(
        "random",
        description="'random' (tiny tests), 'wan' (a diffusers Wan folder), 'wan_original' (an original / "
        "DiffSynth .safetensors file), 'astra' (an Astra checkpoint folder: continue fine-tuning).",
    )
    path: str | None = Field(None, description="The folder or file for every kind but 'random'.")
    base: str | None = Field(None, description="Base Wan folder for an adapter-only Astra checkpoint.")
    seed: int = Field(0, description="Seed of a random initialisation.")

    @model_validator(mode="after")
    def _path_needed(self) -> InitConfig:
        if self.kind != "random" and not self.path:
            raise ValueError(f"path: init.kind '{self.kind}' needs a path")
        return self


class TrainConfig(FrozenModel):
    stage: Literal["finetune", "pretrain"] = Field(
        "finetune",
        description="'finetune': Astra (packed history + actions, the adapter whitelist). 'pretrain': plain "
        "text-to-video on clip segments of data.target_latents latents with no history and no actions — what "
        "Wan-2.1 is to the real model; trains the Wan weights (trainable defaults to the backbone's own) "
        "and exports a diffusers Wan folder that a fine-tuning run loads with init.kind=wan.",
    )
    astra: AstraConfig = Field(default_factory=AstraConfig, description="Model, objective and sampler.")
    init: InitConfig = Field(default_factory=InitConfig, description="Starting weights.")
    trainable: tuple[str, ...] = Field(
        TRAINABLE_PATTERNS,
        description="Regexes of the parameters fine-tuned (searched in state-dict keys); the default is "
        "Astra's whitelist: self-attention, ACT-Adapter projectors, experts, action encoder, history "
        "embedders. Everything else stays frozen, bitwise.",
    )
    data: DataConfig = Field(default_factory=DataConfig, description="Samples from the latent store.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimiser and schedule.")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="Workers and sharding.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpoints.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Which Ray cluster runs the job.")
    run_name: str = Field("astra-train", min_length=1, description="Run name: the same name resumes.")
    storage_path: str = Field(
        "runs/train", description="Where runs live (checkpoints, MLflow default store): local path or s3://."
    )
    storage_s3_endpoint: str | None = Field(
        None,
        description="S3-compatible endpoint of an s3:// storage_path, e.g. http://host:9000 (None: AWS, or "
        "$AWS_ENDPOINT_URL); credentials from the usual AWS_* variables on every node.",
    )
    max_steps: int = Field(1000, ge=1, description="Optimiser steps of the run.")
    batch_size: int = Field(1, ge=1, description="Samples per worker per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimiser step.")
    seed: int = Field(0, description="Seed of sampling, noise and corruption (per worker: seed + rank).")
    log_every: int = Field(10, ge=1, description="Steps between metric logs and progress lines.")
    eval_every: int = Field(200, ge=1, description="Steps between validation losses.")
    sample_every: int = Field(1000, ge=1, description="Steps between sample rollouts logged as videos.")
    sample_chunks: int = Field(2, ge=1, description="Chunks per sample rollout.")
    fail_at_step: int | None = Field(
        None, ge=1, description="Fault injection for tests: rank 1 (or 0) dies once at this step."
    )

    @model_validator(mode="before")
    @classmethod
    def _stage_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("stage") == "pretrain" and "trainable" not in data:
            data = {**data, "trainable": BACKBONE_PATTERNS}
        return data

    @property
    def history_latents(self) -> int:
        """The fewest history latents a sample has: 0 when pretraining (text-to-video), else 1."""
        return 0 if self.stage == "pretrain" else 1

    @property
    def target_latents(self) -> int:
        return self.data.target_latents or self.astra.model.framepack.target_frames

    def storage(self):
        """(pyarrow filesystem, path) of ``storage_path``."""
        return resolve(self.storage_path, self.storage_s3_endpoint)

    @property
    def max_history(self) -> int:
        fp = self.astra.model.framepack
        window = int(fp.keep_anchor) + fp.recent_frames + fp.frames_2x + fp.frames_4x
        return self.data.history.max_latents or window


TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # the paper: 8 GPUs, AdamW 1e-5, bf16; weights from a diffusers Wan-2.1 T2V 1.3B folder
    "wan2.1-1.3b": {
        "astra": PRESETS["wan2.1-1.3b"],
        "init": {"kind": "wan", "path": "Wan2.1-T2V-1.3B-Diffusers"},
        "parallel": {"workers": 8, "use_gpu": True},
    },
    # a laptop: the tiny model, random weights, a few hundred steps on CPU workers
    "tiny": {
        "astra": PRESETS["tiny"],
        "optim": {"lr": 1e-3, "warmup_steps": 5, "weight_decay": 0.0},
        "parallel": {"param_dtype": "float32"},
        "checkpoint": {"every_steps": 20, "keep_last": 2},
        "max_steps": 40,
        "batch_size": 2,
        "log_every": 5,
        "eval_every": 20,
        "sample_every": 40,
        "data": {"val_clips": 2, "shuffle_buffer": 32},
    },
}


# the demo world (`make demo`): the demo model, fine-tuned in minutes on 2 CPU cores
# The zero-initialised action pathway (experts, action projectors) trains at 10x the lr: measured on the
# demo store (p = 0, single process), the validation action gain at sigma 0.9 reached +0.017 after 1,200
# steps at 10x vs at most +0.003 after 4,000 at 1x (the fine-tuning job); a toy (targets = history shifted
# by the action) +0.10 vs +0.03 after 500 steps.
TRAIN_PRESETS["demo"] = {
    "astra": PRESETS["demo"],
    "optim": {
        "lr": 5e-4,
        "warmup_steps": 50,
        "weight_decay": 0.0,
        "lr_scale": {r"\.moe\.|^action_encoder\.": 10.0},
    },
    "parallel": {"param_dtype": "float32"},
    "checkpoint": {"every_steps": 250, "keep_last": 2},
    "max_steps": 1000,
    "batch_size": 8,
    "log_every": 10,
    "eval_every": 250,
    "sample_every": 1000,
    "data": {"val_clips": 8, "shuffle_buffer": 256},
}


def load_train_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    return load_config(path, overrides, model_cls=TrainConfig, presets=TRAIN_PRESETS)


def resolve_paths(config: TrainConfig) -> TrainConfig:
    """Before any cluster starts: storage and store as absolute paths (or s3://), a tracking server for
    remote storage (the default MLflow store is a file beside local storage)."""
    data = config.model_dump()
    data["storage_path"] = resolve_local("storage_path", config.storage_path)
    data["data"]["store"]["uri"] = resolve_local("data.store.uri", config.data.store.uri)
    if "://" in data["storage_path"] and config.tracking.tracking_uri is None:
        raise ConfigError(
            "tracking.tracking_uri: storage_path is remote; give an MLflow tracking server URI "
            "(the default store is a local sqlite file beside the runs)"
        )
    if config.init.kind != "random" and config.init.path:
        data["init"]["path"] = resolve_local("init.path", config.init.path)
    if config.init.base:
        data["init"]["base"] = resolve_local("init.base", config.init.base)
    if config.astra.vae.pretrained_path:  # the workers (sample videos, export) run in other folders
        data["astra"]["vae"]["pretrained_path"] = resolve_local(
            "astra.vae.pretrained_path", config.astra.vae.pretrained_path
        )
    return TrainConfig.model_validate(data)
