"""The training job on the driver: check the data, then one Ray Train ``TorchTrainer`` run.

Everything that can be wrong with the config or the store is found by ``plan_data`` before a single
worker starts. The run is named by ``run_name`` under ``storage_path``: re-running the same command
resumes from its last checkpoint (Ray Train V2), and ``FailureConfig(max_failures)`` restarts the
worker group from there when a worker dies. Progress lines come from a controller callback fed by
the workers' ``ray.train.report``.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import time
from pathlib import Path

import ray
import ray.train
from ray.train.torch import TorchTrainer

from astra.config import ConfigError
from astra.train.config import TrainConfig
from astra.train.dataset import DATA_CPUS, DataPlan, rank_datasets
from astra.train.loop import train_loop
from astra.train.tracking import config_hash

log = logging.getLogger("astra.train")


class Progress(ray.train.UserCallback):
    """A line per reported step: loss, throughput, ETA (runs in Ray Train's controller)."""

    def __init__(self, max_steps: int):
        self.max_steps = max_steps
        self.first: tuple[float, int] | None = None

    def after_report(self, run_context, metrics, checkpoint):
        m = metrics[0] if metrics else {}
        if "step" not in m:
            return
        step, now = int(m["step"]), time.monotonic()
        if self.first is None or step <= self.first[1]:
            self.first = (now, step)
        done = step - self.first[1]
        eta = f"{(now - self.first[0]) / done * (self.max_steps - step):.0f} s" if done else "?"
        val = f", val {m['val_loss']:.4f}" if "val_loss" in m else ""
        if "val_action_gain" in m:  # what the actions are worth to the model (see Worker.val_loss)
            val += f" (action gain {m['val_action_gain']:+.4f})"
        tokens = f", {m['tokens_per_s']:.0f} tokens/s" if "tokens_per_s" in m else ""
        saved = ", checkpoint" if checkpoint is not None else ""
        print(
            f"step {step}/{self.max_steps}: loss {m['loss']:.4f}{val}, lr {m['lr']:.2e}, "
            f"{m['samples_per_s']:.2f} samples/s{tokens}, ETA {eta}{saved}",
            flush=True,
        )


def git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)  # fmt: skip
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def worker_cpus(config: TrainConfig, cluster: dict[str, float]) -> float:
    """CPUs per worker that fit ``cluster`` (``ray.cluster_resources()``) beside each worker's data
    reads; ConfigError naming the settings when the workers cannot all run at once."""
    p = config.parallel
    if not p.fit_to_cluster:  # an autoscaling cluster: the request waits for nodes
        return p.cpus_per_worker or 1.0
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    if p.use_gpu and gpus < p.workers:
        raise ConfigError(
            f"parallel.workers: {p.workers} GPU workers need {p.workers} GPUs, the cluster has {gpus:g}"
        )
    reads = DATA_CPUS * p.workers
    per = p.cpus_per_worker
    if per is None:
        per = min(1.0, math.floor((cpus - reads) / p.workers * 100) / 100)
    if per < 0.25 or per * p.workers + reads > cpus + 1e-9:
        raise ConfigError(
            f"parallel: {p.workers} workers x {max(per, 0.25):g} CPU + data reads {reads:g} CPU exceed the "
            f"cluster's {cpus:g} CPUs: lower parallel.workers or parallel.cpus_per_worker, or add CPUs"
        )
    return per


def run_training(config: TrainConfig, plan: DataPlan) -> ray.train.Result:
    p = config.parallel
    per_worker = worker_cpus(config, ray.cluster_resources())
    fs, path = config.storage()
    tags = {
        "astra.git_revision": git_revision(),
        "astra.config_hash": config_hash(config),
        "astra.encode_hash": plan.encode_hash,
        "astra.run_name": config.run_name,
    }
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": config, "plan": plan, "tags": tags},
        scaling_config=ray.train.ScalingConfig(
            num_workers=p.workers, use_gpu=p.use_gpu, resources_per_worker={"CPU": per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=config.run_name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=p.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.checkpoint.keep_last),
            callbacks=[Progress(config.max_steps)],
        ),
        datasets=rank_datasets(plan, config),
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )
    log.info("training %s: %d workers, %d train clips, %d held out, encode hash %s, storage %s",
             config.run_name, p.workers, plan.num_train, len(plan.val_ids), plan.encode_hash,
             os.path.join(config.storage_path, config.run_name))  # fmt: skip
    result = trainer.fit()
    prune_unregistered(config, result)
    return result


def prune_unregistered(config: TrainConfig, result: ray.train.Result) -> list[str]:
    """Delete checkpoint folders Ray Train never registered: a worker that dies right after uploading
    its part leaves a folder the restarted run does not use (it resumes from the last *registered*
    checkpoint) and ``keep_last`` never counts. Returns the deleted paths."""
    if result.error is not None:
        return []  # the run may be re-run: leave everything as it is
    import pyarrow.fs as pafs

    fs, root = config.storage()
    kept = {checkpoint.path.rstrip("/") for checkpoint, _ in result.best_checkpoints}
    run_dir = f"{root}/{config.run_name}"
    stale = [
        info.path
        for info in fs.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True))
        if info.type == pafs.FileType.Directory
        and info.base_name.startswith("checkpoint_")
        and info.path.rstrip("/") not in kept
    ]
    for path in stale:
        fs.delete_dir(path)
    if stale:
        log.info("deleted %d checkpoint folder(s) Ray Train never registered", len(stale))
    return stale


def describe(config: TrainConfig, result: ray.train.Result) -> str:
    """What the run produced, for the job's last lines."""
    from astra.train.tracking import default_tracking_uri, find_run

    m = result.metrics or {}
    lines = [f"trained {config.run_name} to step {m.get('step', '?')}: loss {m.get('loss', float('nan')):.4f}"
             + (f", val {m['val_loss']:.4f}" if "val_loss" in m else "")
             + (f", action gain {m['val_action_gain']:+.4f}" if "val_action_gain" in m else "")]  # fmt: skip
    if result.checkpoint is not None:
        lines.append(f"  last checkpoint: {result.checkpoint.path}")
    run = find_run(config)
    if run is not None:
        tags = run.data.tags
        lines.append(
            f"  MLflow run {run.info.run_id} ({config.tracking.tracking_uri or default_tracking_uri(config)})"
        )
        from astra.train.loop import export_name

        kind = "Wan backbone (diffusers folder)" if config.stage == "pretrain" else "adapter folder"
        uri = f"runs:/{run.info.run_id}/export/{export_name(config)}"
        lines.append(f"  {kind}: {uri} (mlflow artifacts download -u {uri})")
        if "astra.registered_model" in tags:
            lines.append(f"  adapter: {tags['astra.registered_model']}")
        if "astra.frozen_unchanged" in tags:
            lines.append(f"  frozen weights bitwise unchanged: {tags['astra.frozen_unchanged']}")
    return "\n".join(lines)
