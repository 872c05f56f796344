"""The evaluation job on the driver: plan the cases, fan them out over Ray tasks, write the report,
log everything to MLflow."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from astra.config import ConfigError
from astra.evaluate.config import EvalConfig
from astra.evaluate.rollouts import CaseResult, Job, run_jobs

log = logging.getLogger("astra.evaluate")


def check_held_out(config: EvalConfig) -> None:
    """No case's world seed may be one a training clip used (ConfigError naming ``seed``)."""
    if config.train_store is None:
        return
    from astra.evaluate.cases import seeds_in_store, world_seed

    used = seeds_in_store(config.train_store)
    clash = sorted(
        {
            f"{m}-{i}"
            for m in config.modalities
            for i in range(config.cases)
            if world_seed(config.seed, m, i) in used
        }
    )
    if clash:
        raise ConfigError(
            f"seed: the cases {clash[:5]} use world seeds the training store holds; change seed"
        )


def plan_jobs(config: EvalConfig) -> list[tuple[Job, bool]]:
    """Every (job, keep a preview) of the evaluation: the accuracy cases, then the drift cases (the
    first of each modality keeps a preview strip); each job runs every row."""
    jobs = []
    for m in config.modalities:
        jobs += [(Job(m, i, "accuracy"), False) for i in range(config.cases)]
        jobs += [(Job(m, i, "drift"), i == 0) for i in range(config.drift_cases)]
    return jobs


def run_evaluation(config: EvalConfig) -> tuple[list[CaseResult], float]:
    """All results (from Ray tasks on the connected cluster) and the seconds taken. The cases go out
    in a few batches per task slot, at most ``tasks`` at a time, so the log shows progress as they
    finish (each batch loads the models once: a few seconds)."""
    import ray

    jobs = plan_jobs(config)
    tasks = config.tasks or max(1, int(ray.cluster_resources().get("CPU", 1) // config.threads_per_task))
    tasks = min(tasks, len(jobs))
    n = min(len(jobs), 4 * tasks)
    batches = [jobs[i::n] for i in range(n)]
    remote = ray.remote(num_cpus=config.threads_per_task)(run_jobs)
    start = time.monotonic()
    log.info("evaluating %d cases x %d rows (%d modalities) in %d Ray tasks at a time", len(jobs),
             len(config.rows), len(config.modalities), tasks)  # fmt: skip
    results: list[CaseResult] = []
    queued, pending, sizes, cases = list(reversed(batches)), [], {}, 0
    while queued or pending:
        while queued and len(pending) < tasks:
            batch = queued.pop()
            pending.append(ref := remote.remote(config, batch))
            sizes[ref] = len(batch)
        done, pending = ray.wait(pending, num_returns=1)
        results += ray.get(done[0])
        cases += sizes.pop(done[0])
        log.info("%d/%d cases done (%.0f s)", cases, len(jobs), time.monotonic() - start)
    return results, time.monotonic() - start


def default_tracking_uri(config: EvalConfig) -> str:
    return f"sqlite:///{os.path.join(config.report_dir, 'mlflow', 'mlflow.db')}"


def _metric_name(*parts: str) -> str:
    return "/".join("".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in p) for p in parts)


def log_to_mlflow(config: EvalConfig, summary, out: Path, seconds: float) -> str:
    """An MLflow run with the config, accuracy and drift metrics, and the report folder; its id."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from astra.train.tracking import _flatten

    uri = config.tracking_uri or default_tracking_uri(config)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    exp = client.get_experiment_by_name(config.experiment)
    if exp is None:
        location = None
        if uri.startswith("sqlite:///"):
            location = Path(uri.removeprefix("sqlite:///")).parent.joinpath("mlartifacts").as_uri()
        exp_id = client.create_experiment(config.experiment, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    run = client.create_run(exp_id, run_name=config.run_name, tags={"astra.kind": "evaluation"})
    params = list(_flatten(config.model_dump(mode="json")).items())
    for i in range(0, len(params), 100):
        client.log_batch(
            run.info.run_id, params=[mlflow.entities.Param(k, v[:6000]) for k, v in params[i : i + 100]]
        )
    now = int(time.time() * 1000)
    metrics = [mlflow.entities.Metric("seconds", seconds, now, 0)]
    for (row, m), (acc, _) in summary.accuracy.items():
        metrics.append(mlflow.entities.Metric(_metric_name("accuracy", row, m), acc, now, 0))
    for (row, m), (direction, response) in summary.probe.items():
        metrics.append(mlflow.entities.Metric(_metric_name("probe_direction", row, m), direction, now, 0))
        metrics.append(mlflow.entities.Metric(_metric_name("probe_response", row, m), response, now, 0))
    for (row, m), values in summary.psnr.items():
        for k, v in enumerate(values, start=1):
            metrics.append(mlflow.entities.Metric(_metric_name("psnr", row, m), v, now, k))
            metrics.append(
                mlflow.entities.Metric(_metric_name("ssim", row, m), summary.ssim[(row, m)][k - 1], now, k)
            )
    for i in range(0, len(metrics), 500):
        client.log_batch(run.info.run_id, metrics=metrics[i : i + 500])
    for path in sorted(out.iterdir()):  # the report's files (the default MLflow store is a folder beside)
        if path.is_file():
            client.log_artifact(run.info.run_id, str(path), "report")
    client.set_terminated(run.info.run_id)
    return run.info.run_id
