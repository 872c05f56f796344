"""Training a Wan VAE (diffusers ``AutoencoderKLWan``) on a set of clips: ``jobs/train_vae.py``.

The demo world needs latents that *mean* something: a random VAE's latents barely change with the
camera's motion (measured: ground truths of different moves differ by MSE 0.001 at the first latent),
so no world model trained on them can follow actions. This job trains a small VAE of the same class
the real Wan-2.1 uses, on the same Ray Train machinery as the model (``TorchTrainer``, DDP over the
workers, sharded ``torch.distributed.checkpoint`` checkpoints in the run's storage, resume by
re-running the same command, MLflow run with params, metrics and the exported folder).

Data: the clips of a manifest (``python -m astra.data.synthetic`` writes one), decoded with PyAV by
the encode job's reader at the configured size and rate; each worker holds its share in memory
(a demo-sized set: 1,000 clips of 33 frames at 64x64 are 400 MB) and draws random windows of
``clip_frames`` (1 + 4k) frames, seeded by (seed, rank, step) so a resumed run draws what the
uninterrupted one did. Held-out clips (chosen by a hash of their id) give the validation loss and PSNR.

Objective: pixel MSE of the reconstruction from a posterior sample + ``kl_weight`` x KL (+
``still_weight`` x the still-scene loss, ``still_loss``: a still clip's latents kept equal over time). The export
sets the VAE's ``latents_mean`` / ``latents_std`` to per-channel statistics of the training clips'
latents, so ``astra.model.vae.WanVAE`` (which normalises with them) hands the world model unit-scale
latents, as Wan-2.1's own statistics do for the real VAE.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, field_validator

from astra.config import PRESETS, ConfigError, FrozenModel, VAEConfig, load_config
from astra.data.storage import StorageConfig
from astra.runtime import RayConfig, resolve_local
from astra.train.config import CheckpointConfig, OptimConfig, TrackingConfig

log = logging.getLogger("astra.train")


class VAEParallelConfig(FrozenModel):
    """Workers (DDP: the VAE is small, every worker holds all of it)."""

    workers: int = Field(1, ge=1, description="Ray Train workers (one per accelerator).")
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL); False: CPU workers (gloo).")
    cpus_per_worker: float | None = Field(
        None, gt=0, description="CPUs reserved per worker; None: 1, or less so that every worker fits."
    )
    max_failures: int = Field(3, ge=0, description="Worker-group restarts from the last checkpoint.")
    fit_to_cluster: bool = Field(
        True, description="Check the workers fit the cluster at start; False on an autoscaling cluster."
    )


class VAETrainConfig(FrozenModel):
    vae: VAEConfig = Field(
        default_factory=VAEConfig, description="Architecture (and seed) of the VAE trained."
    )
    manifest: str = Field(
        "runs/clips/manifest.jsonl",
        description="Manifest of the training clips (JSONL/Parquet, local or s3://).",
    )
    sources: StorageConfig = Field(
        default_factory=StorageConfig, description="S3 settings for s3:// manifests and clips."
    )
    height: int = Field(64, ge=16, description="Frame height the clips are resized / centre-cropped to.")
    width: int = Field(64, ge=16, description="Frame width.")
    fps: float = Field(16.0, gt=0, description="Rate the clips are sampled at.")
    max_frames: int = Field(33, ge=5, description="Frames read per clip (1 + 4k; longer clips are cut).")
    clip_frames: int = Field(9, ge=1, description="Frames per training window (1 + 4k).")
    val_clips: int = Field(4, ge=0, description="Clips held out for validation (by a hash of their id).")
    kl_weight: float = Field(1e-6, ge=0, description="Weight of the posterior's KL divergence.")
    still_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of the still-scene loss: each window's middle frame repeated as a still clip "
        "of clip_frames frames, whose latents (the first, image-mode one included) are pulled to their "
        "mean over time, relative to their variance. 0: off.",
    )
    optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=20, weight_decay=0.0),
        description="AdamW and its schedule.",
    )
    parallel: VAEParallelConfig = Field(default_factory=VAEParallelConfig, description="Workers.")
    checkpoint: CheckpointConfig = Field(
        default_factory=lambda: CheckpointConfig(every_steps=200, keep_last=2), description="Checkpoints."
    )
    tracking: TrackingConfig = Field(
        default_factory=lambda: TrackingConfig(experiment="astra-vae", register_as=None),
        description="MLflow tracking (register_as is not used: the VAE is an artifact of the run).",
    )
    ray: RayConfig = Field(default_factory=RayConfig, description="Which Ray cluster runs the job.")
    run_name: str = Field("astra-vae", min_length=1, description="Run name: the same name resumes.")
    storage_path: str = Field("runs/vae", description="Where runs live: local path or s3://.")
    storage_s3_endpoint: str | None = Field(
        None, description="S3-compatible endpoint of an s3:// storage_path."
    )
    max_steps: int = Field(1000, ge=1, description="Optimiser steps.")
    batch_size: int = Field(8, ge=1, description="Windows per worker per step.")
    seed: int = Field(0, description="Seed of the windows and posterior samples (per worker: + rank).")
    log_every: int = Field(10, ge=1, description="Steps between metric logs and progress lines.")
    eval_every: int = Field(100, ge=1, description="Steps between validation losses.")

    @field_validator("max_frames", "clip_frames")
    @classmethod
    def _one_plus_4k(cls, v: int) -> int:
        if (v - 1) % 4:
            raise ValueError(f"must be 1 + 4k (the VAE's temporal factor is 4), got {v}")
        return v

    def storage(self):
        from astra.data.storage import resolve

        return resolve(self.storage_path, self.storage_s3_endpoint)


VAE_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "vae": PRESETS["tiny"]["vae"],
        "max_steps": 20,
        "batch_size": 2,
        "eval_every": 10,
        "checkpoint": {"every_steps": 10},
        "val_clips": 2,
        "log_every": 5,
    },
}


# The demo world's VAE, in stages (short clips first, then long ones — a curriculum):
#   demo       9-frame windows (the first frame and two 4-frame groups), 2 per step, ~1.5 s a step on
#              2 CPU cores: the encoder and decoder learn the scenes;
#   demo-long  17-frame windows (four groups) from demo's weights, 1 per step, ~4 s a step. The causal
#              caches of the two temporal downsampling levels reach their steady state only from the
#              fourth chunk on (chunk 0 is the first frame alone; each later one leaves one frame at the
#              deepest level, whose convolutions cache two), which 9-frame windows never reach:
#              measured, the demo stage alone reconstructs 9 frames at 25 dB but 33 at 13 dB (every
#              frame after the ninth smeared and off-colour).
#   demo-whole whole 33-frame clips from demo-long's weights: measured, demo-long's 400 steps reached
#              only 16 dB on whole clips (23.5 dB on its 17-frame windows): errors still grow chunk by chunk.
# Validation is on whole clips in every stage.
VAE_PRESETS["demo"] = {
    "vae": PRESETS["demo"]["vae"],
    "clip_frames": 9,
    "max_steps": 3000,
    "batch_size": 2,
    "optim": {"lr": 1e-3, "warmup_steps": 20, "weight_decay": 0.0},
    "eval_every": 100,
    "checkpoint": {"every_steps": 200},
    "val_clips": 8,
    "log_every": 20,
}
VAE_PRESETS["demo-long"] = {
    **VAE_PRESETS["demo"],
    "clip_frames": 17,
    "max_steps": 400,
    "batch_size": 1,
    "optim": {"lr": 5e-4, "warmup_steps": 20, "weight_decay": 0.0},
}
VAE_PRESETS["demo-whole"] = {  # whole 33-frame clips (eight groups) from demo-long's weights, ~8 s a step
    **VAE_PRESETS["demo-long"],
    "clip_frames": 33,
    "eval_every": 50,
    "checkpoint": {"every_steps": 50},  # a checkpoint every ~7 minutes
}

# demo-still  whole clips from demo-whole's weights plus the still-scene loss (``still_loss``): the
#             three stages above leave a VAE whose latents drift with their index on a still scene
#             (consecutive latents of a still clip differ by MSE 0.9 at the start, ~0.15 later, against
#             a variance of 0.38), which the world model could not learn to continue.
VAE_PRESETS["demo-still"] = {
    **VAE_PRESETS["demo-whole"],
    "still_weight": 0.1,
    "max_steps": 150,
    "optim": {"lr": 3e-4, "warmup_steps": 10, "weight_decay": 0.0},
    "eval_every": 25,
    "checkpoint": {"every_steps": 25},
    "log_every": 5,
}


def load_vae_train_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> VAETrainConfig:
    return load_config(path, overrides, model_cls=VAETrainConfig, presets=VAE_PRESETS)


def resolve_vae_paths(config: VAETrainConfig) -> VAETrainConfig:
    """Absolute paths before Ray starts; a tracking server for remote storage."""
    data = config.model_dump()
    data["storage_path"] = resolve_local("storage_path", config.storage_path)
    data["manifest"] = resolve_local("manifest", config.manifest)
    if config.vae.pretrained_path:  # the workers' working directory is not the caller's
        data["vae"]["pretrained_path"] = resolve_local("vae.pretrained_path", config.vae.pretrained_path)
    if "://" in data["storage_path"] and config.tracking.tracking_uri is None:
        raise ConfigError("tracking.tracking_uri: storage_path is remote; give an MLflow tracking server URI")
    return VAETrainConfig.model_validate(data)


# ----------------------------------------------------------------------------- data


def _held_out(clip_id: str) -> str:
    return hashlib.sha256(clip_id.encode()).hexdigest()


def split_clips(config: VAETrainConfig) -> tuple[list[dict], list[dict]]:
    """(train, val) manifest records (as dicts); ConfigError when there are too few clips."""
    from astra.data.manifest import read_manifest

    try:
        records, _ = read_manifest(config.manifest, config.sources)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    ranked = sorted((r.model_dump() for r in records), key=lambda r: _held_out(r["clip_id"]))
    val, train = ranked[: config.val_clips], ranked[config.val_clips :]
    if len(train) < config.parallel.workers:
        raise ConfigError(
            f"manifest: {len(records)} clips leave {len(train)} for training after val_clips="
            f"{config.val_clips}, fewer than parallel.workers={config.parallel.workers}"
        )
    return train, val


def load_frames(records: list[dict], config: VAETrainConfig) -> list[np.ndarray]:
    """Decode each clip (PyAV, the encode job's reader) to uint8 (N, H, W, 3); unusable clips are
    skipped with a warning (as the encode job quarantines them)."""
    from astra.data.video import ClipError, decode_windows

    out = []
    for r in records:
        try:
            with config.sources.open_binary(r["uri"]) as source:
                window = next(decode_windows(source, (config.height, config.width), config.fps,
                                             config.max_frames, config.clip_frames, 1, r["fps"]))  # fmt: skip
            out.append(window.frames)
        except (ClipError, OSError, ValueError) as err:
            log.warning("skipping clip %s: %s", r["clip_id"], err)
    return out


def draw_windows(clips: list[np.ndarray], count: int, frames: int, rng: np.random.Generator) -> torch.Tensor:
    """``count`` random windows of ``frames`` frames -> video (B, 3, F, H, W) in [-1, 1]."""
    from astra.model.vae import frames_to_video

    picks = []
    for _ in range(count):
        clip = clips[int(rng.integers(len(clips)))]
        start = int(rng.integers(0, len(clip) - frames + 1))
        picks.append(clip[start : start + frames])
    return frames_to_video(torch.from_numpy(np.stack(picks)))


# ----------------------------------------------------------------------------- model


class Reconstruction(torch.nn.Module):
    """The VAE's training forward (DDP syncs gradients of ``forward`` calls only): video and the
    posterior's unit noise -> (reconstruction, KL per sample)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, video: torch.Tensor, generator: torch.Generator | None = None, still: bool = False):
        """``generator``: draw the latent from the posterior with it; None: its mean. ``still``: also
        the still-scene loss (``still_loss``; else zero) — inside forward, where DDP syncs it."""
        posterior = self.vae.encode(video).latent_dist
        z = posterior.mean if generator is None else posterior.sample(generator)
        spread = still_loss(self.vae, video) if still else video.new_zeros(())
        return self.vae.decode(z).sample, posterior.kl().flatten(1).mean(1), spread


def still_loss(vae, video: torch.Tensor) -> torch.Tensor:
    """How much a still scene's latents move with their index: the windows' middle frames repeated
    as still clips, encoded (posterior means); their spread over time / their variance (scale-free:
    shrinking the latents does not lower it).

    Why: a small VAE trained on moving windows alone encodes a still scene differently at every
    latent index — measured on the demo VAE (33-frame still clips): consecutive latents differ by
    MSE 0.89, 0.95, 0.59, 0.24, then ~0.15, against a per-element variance of 0.38 — so the latent
    that follows another depends on where it sits in the clip more than on the scene's motion, and
    the world model trained on them could not learn to continue a history (or follow actions).
    Wan-2.1's own VAE keeps a still scene's latents near constant (trained on images and videos)."""
    frames = video.shape[2]
    still = video[:, :, frames // 2 : frames // 2 + 1].expand(-1, -1, frames, -1, -1).contiguous()
    z = vae.encode(still).latent_dist.mean  # (B, C, T, h, w)
    spread = (z - z.mean(2, keepdim=True)).pow(2).mean()
    return spread / z.detach().var().clamp_min(1e-6)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of videos in [-1, 1] (peak-to-peak 2), per sample."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(4.0 / mse)


@torch.no_grad()
def latent_statistics(vae, clips: list[np.ndarray], frames: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the posterior means of every clip's first ``frames`` frames."""
    from astra.model.vae import frames_to_video

    zs = [vae.encode(frames_to_video(torch.from_numpy(c[None, :frames]))).latent_dist.mean for c in clips]
    z = torch.cat([t.transpose(0, 1).flatten(1) for t in zs], dim=1)  # (C, everything)
    return z.mean(1).tolist(), z.std(1).clamp_min(1e-6).tolist()


STATS_CLIPS = 256  # clips whose latents give the exported VAE's latent statistics


def export_vae(vae, clips: list[np.ndarray], frames: int, folder: Path) -> Path:
    """``folder`` as a diffusers AutoencoderKLWan folder with the clips' latent statistics."""
    mean, std = latent_statistics(vae, clips, frames)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    vae.save_pretrained(str(folder))
    # diffusers writes where a loaded VAE came from (a stage's start weights): a path of this machine
    config = Path(folder) / "config.json"
    fields = json.loads(config.read_text())
    if fields.pop("_name_or_path", None) is not None:
        config.write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
    return folder


# ----------------------------------------------------------------------------- the Ray Train worker


def _save_preview(video: torch.Tensor, recon: torch.Tensor, path: Path) -> Path:
    """Originals over reconstructions, every frame of up to 4 windows side by side, as a PNG."""
    from PIL import Image

    from astra.model.vae import video_to_frames

    a, b = video_to_frames(video[:4]), video_to_frames(recon[:4])  # (B, F, H, W, 3)
    rows = [torch.cat(list(x.flatten(0, 1)), dim=1) for x in (a, b)]  # every frame of every window in a row
    Image.fromarray(torch.cat(rows, dim=0).numpy()).save(path)
    return path


def vae_loop(loop_config: dict) -> None:
    """What each worker runs (``TorchTrainer(vae_loop, train_loop_config={"config": ..., ...})``)."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from astra.model.vae import WanVAE
    from astra.runtime import quiet_ray_logs
    from astra.train import checkpoint as ckpt
    from astra.train.loop import lr_factor
    from astra.train.tracking import Tracker

    quiet_ray_logs()
    config: VAETrainConfig = loop_config["config"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(config.vae.seed)
    vae = WanVAE.from_config(config.vae).vae  # the same seeded initial weights on every rank
    model = ray.train.torch.prepare_model(Reconstruction(vae))  # DDP with more than one worker
    o = config.optim
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay
    )
    everything = (".*",)
    step, run_id = 0, None
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as folder:
            state = ckpt.load(folder, model, optimizer, everything)
        step, run_id = state["step"], state.get("mlflow_run_id")
        if rank == 0:
            print(f"resumed from the checkpoint at step {step} ({resumed.path})", flush=True)
    tracker = Tracker(config, run_id, loop_config["tags"]) if rank == 0 else None
    train_records, val_records = loop_config["train"], loop_config["val"]
    clips = load_frames(train_records[rank::world], config)
    if not clips:
        raise ConfigError(f"manifest: worker {rank} could decode none of its clips")
    val_clips = load_frames(val_records, config) if rank == 0 else []
    # validation on whole clips (1 + 4k frames of the shortest), not training windows: the frames after
    # the first groups go through the causal caches' steady state, which short windows never reach
    whole = (min(len(c) for c in val_clips) - 1) // 4 * 4 + 1 if val_clips else 0
    val_video = (
        draw_windows(val_clips, len(val_clips), whole, np.random.default_rng(0)) if val_clips else None
    )
    scratch = Path(tempfile.mkdtemp(prefix="astra-vae-"))

    def evaluate() -> dict[str, float]:
        if val_video is None:
            return {}
        model.eval()
        with torch.no_grad():
            recon = (model.module if hasattr(model, "module") else model)(val_video.to(device))[0].clamp(
                -1, 1
            )
        model.train()
        return {
            "val_loss": float((recon.cpu() - val_video).pow(2).mean()),
            "val_psnr": float(psnr(recon.cpu(), val_video).mean()),
        }

    model.train()
    while step < config.max_steps:
        start = time.perf_counter()
        rng = np.random.default_rng((config.seed, rank, step))
        video = draw_windows(clips, config.batch_size, config.clip_frames, rng).to(device)
        gen = torch.Generator(device).manual_seed(int(rng.integers(2**31)))
        recon, kl, still = model(video, gen, still=config.still_weight > 0)
        mse = (recon - video).pow(2).mean()
        loss = mse + config.kl_weight * kl.mean() + config.still_weight * still
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip or float("inf"))
        lr = o.lr * lr_factor(step + 1, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        step += 1
        seconds = time.perf_counter() - start
        metrics = {"loss": loss.item(), "mse": mse.item(), "kl": kl.mean().item(), "still": still.item(), "grad_norm": float(grad_norm),
                   "lr": lr, "samples_per_s": config.batch_size * world / seconds, "step_seconds": seconds}  # fmt: skip
        if dist.is_initialized():  # the loss over all ranks
            t = torch.tensor([metrics["loss"], metrics["mse"]])
            dist.all_reduce(t)
            metrics["loss"], metrics["mse"] = (t / world).tolist()
        last = step == config.max_steps
        if step % config.eval_every == 0 or last:
            metrics |= evaluate()
        metrics["step"] = step
        if tracker is not None and (step % config.log_every == 0 or last or "val_loss" in metrics):
            tracker.metrics({k: v for k, v in metrics.items() if k != "step"}, step)
        if step % config.checkpoint.every_steps == 0 or last:
            with tempfile.TemporaryDirectory() as folder:
                state = {"step": step, "mlflow_run_id": tracker.run_id if tracker else None}
                ckpt.save(folder, model, optimizer, state, rank, everything)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        elif step % config.log_every == 0:
            ray.train.report(metrics)
    if rank != 0:
        return
    plain = model.module if hasattr(model, "module") else model
    plain.eval()
    if val_video is not None:
        with torch.no_grad():
            recon = plain(val_video.to(device))[0].cpu()
        tracker.artifact(
            _save_preview(val_video, recon, scratch / f"reconstruction-step{step:07d}.png"), "samples"
        )
    # the latent statistics from at most STATS_CLIPS clips spread over the set (as encode sees clips): a
    # few hundred clips pin per-channel means and stds down; encoding every one of 1,600 took minutes
    sample = clips[:: max(1, len(clips) // STATS_CLIPS)][:STATS_CLIPS]
    exported = export_vae(plain.vae.cpu(), sample, config.max_frames, scratch / "vae")
    tracker.artifact(exported, "export")
    tracker.client.set_tag(tracker.run_id, "astra.exported", "true")
    tracker.finish()


def run_vae_training(config: VAETrainConfig):
    """One Ray Train run (the driver side): ``ray.train.Result``."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from astra.train.run import Progress, git_revision, worker_cpus
    from astra.train.tracking import config_hash

    train, val = split_clips(config)
    per_worker = worker_cpus(config, ray.cluster_resources())
    fs, path = config.storage()
    tags = {"astra.git_revision": git_revision(), "astra.config_hash": config_hash(config),
            "astra.run_name": config.run_name, "astra.kind": "vae"}  # fmt: skip
    trainer = TorchTrainer(
        vae_loop,
        train_loop_config={"config": config, "train": train, "val": val, "tags": tags},
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.parallel.workers,
            use_gpu=config.parallel.use_gpu,
            resources_per_worker={"CPU": per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=config.run_name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=config.parallel.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.checkpoint.keep_last),
            callbacks=[Progress(config.max_steps)],
        ),
    )
    log.info("training the VAE %s: %d workers, %d clips, %d held out, storage %s", config.run_name,
             config.parallel.workers, len(train), len(val), os.path.join(config.storage_path, config.run_name))  # fmt: skip
    return trainer.fit()


def describe_vae_run(config: VAETrainConfig, result) -> str:
    """What the run produced, for the job's last lines."""
    from astra.train.tracking import default_tracking_uri, find_run

    m = result.metrics or {}
    line = f"trained the VAE {config.run_name} to step {m.get('step', '?')}: mse {m.get('mse', float('nan')):.5f}"
    if "val_psnr" in m:
        line += f", val PSNR {m['val_psnr']:.2f} dB"
    lines = [line]
    run = find_run(config)
    if run is not None:
        uri = f"runs:/{run.info.run_id}/export/vae"
        lines.append(
            f"  MLflow run {run.info.run_id} ({config.tracking.tracking_uri or default_tracking_uri(config)})"
        )
        lines.append(f"  VAE (diffusers folder): {uri} (mlflow artifacts download -u {uri})")
    return "\n".join(lines)
