"""Fitting the encode pipeline to the cluster, and saying what is starved when it stops moving.

Pure functions of the config and Ray's resource dictionaries (``ray.cluster_resources()`` /
``ray.available_resources()``), so they are testable without a cluster.

Why this exists: the stages hold resources for the whole job (the VAE, prompt and writer actors) or per
clip (decode tasks). If the actors leave less than one decode task's CPUs free, Ray Data waits for a
CPU that never comes and the job sits at 0 clips forever, silently. ``size_pipeline`` therefore fills in
the unset compute fields from the cluster and refuses, before anything starts, a pipeline that cannot
run, naming the settings to change; ``diagnose`` explains a stall while the job runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from astra.config import ConfigError
from astra.encode.config import EncodeConfig

PROMPT_CPUS = 0.25  # the prompt embedder: a small text encoder, idle most of the time
WRITER_CPUS = 0.25  # the shard writer: Parquet encoding + one PUT per shard
GIB = 2**30


@dataclass(frozen=True)
class StagePlan:
    """What each stage reserves on the cluster."""

    decode_cpus: float
    decode_memory: int  # bytes per decode task
    vae_actors: int
    vae_cpus: float
    vae_gpus: float
    prompt_cpus: float = PROMPT_CPUS
    writer_cpus: float = WRITER_CPUS

    @property
    def actor_cpus(self) -> float:
        return self.vae_actors * self.vae_cpus + self.prompt_cpus + self.writer_cpus

    def describe(self) -> str:
        return (
            f"decode {self.decode_cpus:g} CPU + {self.decode_memory / GIB:.2f} GiB per task; "
            f"VAE {self.vae_actors} actor(s) x ({self.vae_cpus:g} CPU, {self.vae_gpus:g} GPU); "
            f"prompts {self.prompt_cpus:g} CPU; writer {self.writer_cpus:g} CPU"
        )


def decode_memory(config: EncodeConfig) -> int:
    """A decode task's working set: about two windows of uint8 frames plus PyAV's buffers (the
    pending window, the one being filled, and their bytes copies)."""
    v = config.video
    return 4 * v.max_frames * v.height * v.width * 3 + 256 * 2**20


def size_pipeline(config: EncodeConfig, cluster: dict[str, float]) -> StagePlan:
    """The stages' reservations on a cluster with ``cluster`` resources (``ray.cluster_resources()``).

    Raises ConfigError, naming the settings to change, when the pipeline cannot run there."""
    c = config.compute
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    memory = float(cluster.get("memory", 0))
    if not c.fit_to_cluster:  # an autoscaling cluster: take the settings as they are
        return StagePlan(
            c.decode_num_cpus, decode_memory(config), c.vae_actors or 1, c.vae_num_cpus or 1.0, c.vae_num_gpus
        )
    if c.vae_num_gpus > 0 and gpus < c.vae_num_gpus:
        raise ConfigError(
            f"compute.vae_num_gpus: each VAE actor needs {c.vae_num_gpus:g} GPU but the cluster has "
            f"{gpus:g}; set compute.vae_num_gpus=0 to encode on CPUs, or compute.fit_to_cluster=false "
            "if GPU nodes join on demand"
        )
    if c.vae_actors is not None:
        actors = c.vae_actors
    elif c.vae_num_gpus > 0:
        actors = max(1, math.floor(gpus / c.vae_num_gpus + 1e-9))
    else:
        actors = 1
    if c.vae_num_gpus > 0 and actors * c.vae_num_gpus > gpus + 1e-9:
        raise ConfigError(
            f"compute.vae_actors: {actors} actors x compute.vae_num_gpus={c.vae_num_gpus:g} need "
            f"{actors * c.vae_num_gpus:g} GPUs, the cluster has {gpus:g}"
        )
    fixed = PROMPT_CPUS + WRITER_CPUS + c.decode_num_cpus  # what must fit beside the VAE actors
    vae_cpus = c.vae_num_cpus
    if vae_cpus is None:  # 1 CPU each, less on a small cluster (never under a quarter)
        vae_cpus = min(1.0, (cpus - fixed) / actors)
        vae_cpus = math.floor(vae_cpus * 100) / 100
    need = actors * vae_cpus + fixed
    if vae_cpus < 0.25 - 1e-9 or need > cpus + 1e-9:
        raise ConfigError(
            f"compute: the pipeline needs {max(need, actors * 0.25 + fixed):g} CPUs "
            f"({actors} VAE actor(s) x {max(vae_cpus, 0.25):g} + prompts {PROMPT_CPUS:g} + writer "
            f"{WRITER_CPUS:g} + one decode task {c.decode_num_cpus:g}) but the cluster has {cpus:g}: lower "
            "compute.vae_actors, compute.vae_num_cpus or compute.decode_num_cpus, or add CPUs"
        )
    plan = StagePlan(c.decode_num_cpus, decode_memory(config), actors, vae_cpus, c.vae_num_gpus)
    if memory and plan.decode_memory > memory:
        raise ConfigError(
            f"video: a decode task needs {plan.decode_memory / GIB:.1f} GiB for windows of "
            f"{config.video.max_frames} frames at {config.video.height}x{config.video.width}, the cluster "
            f"has {memory / GIB:.1f} GiB: lower video.max_frames or the resolution"
        )
    return plan


def _free(available: dict[str, float], total: dict[str, float], key: str, scale: float = 1.0) -> str:
    return f"{available.get(key, 0) / scale:.2f}/{total.get(key, 0) / scale:.2f}"


def diagnose(
    plan: StagePlan,
    activity: dict[str, dict],
    available: dict[str, float],
    total: dict[str, float],
    idle_s: float,
) -> str:
    """Why no clip finished for ``idle_s`` seconds: a readable verdict and the evidence.

    ``activity``: per stage, ``{"active": [(key, detail, age_s), ...], "finished": n}`` (the tracker's
    snapshot); ``available`` / ``total``: Ray's resource dictionaries."""
    decode = activity.get("decode", {"active": [], "finished": 0})
    vae = activity.get("vae", {"active": [], "finished": 0})
    free_cpu, free_gpu = available.get("CPU", 0.0), available.get("GPU", 0.0)
    free_mem = available.get("memory", float("inf"))
    lines = [
        f"no clip finished in the last {idle_s:.0f} s.",
        f"  free now: CPU {_free(available, total, 'CPU')}, GPU {_free(available, total, 'GPU')}, "
        f"memory {_free(available, total, 'memory', GIB)} GiB",
        f"  the stages reserve: {plan.describe()}",
        f"  decode: {len(decode['active'])} running, {decode['finished']} done; "
        f"VAE: {len(vae['active'])} batch(es) running, {vae['finished']} done",
    ]
    slow = [a for a in decode["active"] if a[2] >= idle_s / 2]
    if slow:
        key, detail, age = max(slow, key=lambda a: a[2])
        verdict = (
            f"decode of clip '{key}' ({detail}) has run {age:.0f} s: a slow or hanging read of its video "
            "or poses (a stalled network mount or S3 endpoint?)"
        )
    elif not decode["active"] and (free_cpu < plan.decode_cpus or free_mem < plan.decode_memory):
        short = "CPU" if free_cpu < plan.decode_cpus else "memory"
        verdict = (
            f"decode is starved of {short}: a task needs {plan.decode_cpus:g} CPU + "
            f"{plan.decode_memory / GIB:.2f} GiB and the actors leave {free_cpu:g} CPU free; lower "
            "compute.vae_actors / compute.vae_num_cpus / compute.decode_num_cpus, or add nodes"
        )
    elif vae["finished"] == 0 and not vae["active"] and plan.vae_gpus > free_gpu:
        verdict = (
            f"the VAE actors cannot start: each needs {plan.vae_gpus:g} GPU, {free_gpu:g} free; lower "
            "compute.vae_actors or compute.vae_num_gpus, or add GPU nodes"
        )
    elif vae["active"]:
        verdict = "the VAE is busy: the pipeline is slow, not stuck (a large batch on a slow device?)"
    else:
        verdict = "no stage is short of resources: a stage is slow or stuck; Ray's logs say more"
    return "\n".join([f"stalled? {verdict}", *lines])
