"""The training job on a real local Ray cluster: FSDP2 over gloo, MLflow, resume, a killed worker."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import job_env, kill_session
from mlflow.tracking import MlflowClient

from astra.config import ConfigError
from astra.data.synthetic import write_dataset
from astra.encode.config import load_encode_config
from astra.encode.pipeline import run_encode
from astra.model import build_wan
from astra.train.config import load_train_config, resolve_paths
from astra.train.dataset import READ_TASKS, plan_data, rank_datasets
from astra.train.flops import backward_flops, forward_flops, train_step_flops
from astra.train.parallelize import check_model
from astra.train.run import run_training
from astra.train.tracking import find_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def train_store(tmp_path_factory, ray_local):
    """A small synthetic store: 12 clips (camera, driving, robot) of 33 frames = 9 latents."""
    root = tmp_path_factory.mktemp("train-data")
    manifest = write_dataset(root / "clips", 12, "mixed", size=(64, 64), num_frames=33, fps=16.0, seed=11)
    config = load_encode_config(None, ["preset=tiny", f"manifest={manifest}", f"store.uri={root / 'store'}"])
    assert run_encode(config).encoded == 12
    return root / "store"


def _config(store: Path | str, storage: Path | str, *extra: str):
    return resolve_paths(
        load_train_config(
            None,
            [
                "preset=tiny",
                f"data.store.uri={store}",
                f"storage_path={storage}",
                f"tracking.register_as=astra-test-{uuid.uuid4().hex[:8]}",
                "log_every=1",
                *extra,
            ],
        )
    )


def _history(config, key: str) -> dict[int, float]:
    run = find_run(config)
    return {m.step: m.value for m in MlflowClient().get_metric_history(run.info.run_id, key)}


def _train(config):
    result = run_training(config, plan_data(config, config.parallel.workers))
    assert result.error is None, result.error
    return result


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_job_rerun_with_the_same_command_repeats_the_uninterrupted_run(train_store, tmp_path):
    """kill -9 of the whole job (driver, its local Ray, the workers) once a checkpoint is registered, then
    the same command again: it resumes there, and every loss equals an uninterrupted run's, bitwise."""
    common = ["max_steps=12", "checkpoint.every_steps=3", "eval_every=1000", "sample_every=1000",
              "tracking.register_as=null"]  # fmt: skip
    whole = _config(train_store, tmp_path / "whole", *common)
    _train(whole)
    want = _history(whole, "loss")
    assert sorted(want) == list(range(1, 13))

    storage = tmp_path / "split"
    args = [f"data.store.uri={train_store}", f"storage_path={storage}", "log_every=1", *common]
    cmd = [sys.executable, str(ROOT / "jobs" / "train.py"), "preset=tiny", *args]
    registered = storage / "astra-train" / "checkpoint_manager_snapshot.json"  # Ray Train's own record
    proc = subprocess.Popen(cmd, env=job_env(), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and not registered.exists():
            time.sleep(0.1)
        assert proc.poll() is None, "the job finished before it could be killed"
    finally:
        kill_session(proc.pid)
        proc.wait(30)
    split = _config(train_store, storage, *common)
    before = _history(split, "loss")
    assert 3 <= max(before) < 12, sorted(before)  # killed mid-run, after a checkpoint

    done = subprocess.run(cmd, env=job_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = int(re.search(r"resumed from the checkpoint at step (\d+)", done.stdout + done.stderr)[1])
    assert resumed % 3 == 0 and 3 <= resumed <= max(before)
    assert "step 12/12: loss" in done.stdout
    points = MlflowClient().get_metric_history(find_run(split).info.run_id, "loss")
    assert {m.step for m in points} == set(range(1, 13))  # one MLflow run, continued
    # steps logged twice (done before the kill, redone after the resume) agree too: optimizer, data, noise
    assert all(m.value == want[m.step] for m in points), [(m.step, m.value, want[m.step]) for m in points]


def _train_job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "train.py"), "preset=tiny", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["astra.model.actions.modalities=[{name: camera, raw_dim: 12, expert: 0}]"],
            "astra.model.actions.modalities",
        ),
        (["trainable=[nothing_matches_this]"], "trainable: the patterns"),
        (["data.history.max_latents=40"], "data.history.max_latents: 40 history"),
        (["data.target_latents=12"], "data.target_latents: a sample needs 13 latents"),
        (
            ["astra.model.backbone.text_dim=4096"],
            "astra.model.backbone.text_dim: the store's prompt embeddings are 384-d",
        ),
        (
            [
                "astra.vae.z_dim=16",
                "astra.model.backbone.in_channels=16",
                "astra.model.backbone.out_channels=16",
            ],
            "astra.model.backbone.in_channels: the store's latents have 4 channels",
        ),
    ],
)
def test_bad_config_is_named_before_any_worker_starts(train_store, tmp_path, args, message, capsys):
    """The job's own main() (the first case as the command itself, in a process of its own)."""
    argv = [f"data.store.uri={train_store}", f"storage_path={tmp_path}", *args]
    if "modalities" in args[0]:
        run = _train_job(*argv)
        code, out, err = run.returncode, run.stdout, run.stderr
    else:  # in this process: a bad config returns before Ray starts (the check below)
        from jobs.train import main

        code = main(["preset=tiny", *argv])
        out, err = capsys.readouterr()
    assert code == 2 and message in err, err[-2000:]
    assert "Ray (" not in out + err  # nothing started


@pytest.mark.ray
def test_each_rank_reads_its_shards_in_order_with_a_bounded_pool_of_read_tasks(train_store, tmp_path):
    # the reads reserve no CPU, so only the pool size bounds them: unbounded, Ray Data started one
    # task (a Python worker) per shard at once and a 300-shard store ran the box out of memory
    import pyarrow.parquet as pq

    config = _config(train_store, tmp_path, "parallel.workers=2")
    plan = plan_data(config, 2)
    for i, (name, ds) in enumerate(rank_datasets(plan, config).items()):
        assert name == f"rank{i}" and ds._logical_plan.dag.compute.size == READ_TASKS
        expected = [
            r for f in plan.rank_files[i] for r in pq.read_table(f, columns=["clip_id"]).column(0).to_pylist()
        ]
        assert [row["clip_id"] for row in ds.iter_rows()] == expected and expected


def test_empty_or_missing_store_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    for store in (tmp_path / "empty", tmp_path / "missing"):
        config = _config(store, tmp_path / "runs")
        with pytest.raises(ConfigError, match=r"data\.store\.uri: no latents"):
            plan_data(config, 1)
    check_model(_config(tmp_path, tmp_path / "runs"))  # the default whitelist selects parameters


def test_flops_match_hand_arithmetic():
    from astra.config import preset

    bb = preset("tiny").model.backbone  # D = 24, F = 48, 2 layers
    n, lc, d, f = 100, 10, 24, 48
    self_attn = 8 * n * d * d + 4 * n * n * d
    cross = 4 * n * d * d + 4 * lc * d * d + 4 * n * lc * d
    per_block = self_attn + cross + 4 * n * d * f + 2 * n * d * d
    assert forward_flops(bb, n, lc) == 2 * per_block
    # backward with the default whitelist: self-attention and the projector train (weights + activations,
    # attention maths twice), cross-attention's query side and the FFN pass gradients on (activations
    # only), the text side of cross-attention needs none
    backward = (8 * n * d * d) * 2 + (4 * n * n * d) * 2 + 4 * n * d * d + 4 * n * lc * d + 4 * n * d * f
    backward += (2 * n * d * d) * 2
    assert backward_flops(bb, n, lc) == 2 * backward
    assert train_step_flops(bb, n, lc, samples=3) == 3 * 2 * (per_block + backward)
    # everything trainable: the textbook three forwards, less the activation gradients of the text
    every = backward_flops(bb, n, lc, (r".",))
    assert every == 2 * (2 * per_block - 4 * lc * d * d)


@pytest.mark.ray
@pytest.mark.slow
def test_train_job_submitted_to_a_head_node(train_store, tmp_path, ray_head):
    """`ray job submit --working-dir . -- python jobs/train.py ...` against `ray start --head --num-cpus=2`."""
    from conftest import submit_job
    from test_encode_cluster import _checkout_copy

    copy = _checkout_copy(tmp_path / "checkout")
    job = submit_job(
        ray_head,
        "python", "jobs/train.py", "preset=tiny", f"data.store.uri={train_store}", f"storage_path={tmp_path / 'runs'}",
        "max_steps=4", "checkpoint.every_steps=2", "eval_every=4", "sample_every=4", "log_every=2",
        working_dir=copy,
    )  # fmt: skip
    out = job.stdout + job.stderr
    assert job.returncode == 0, out[-4000:]
    assert "step 4/4: loss" in out and "trained astra-train to step 4" in out
    assert "adapter: models:/astra-adapter/" in out and "frozen weights bitwise unchanged: true" in out


def test_wan_weights_of_another_architecture_are_named_before_any_worker(tmp_path):
    from astra.config import preset

    wan = build_wan(preset("tiny").model.backbone)
    wan.save_pretrained(tmp_path / "wan")
    config = _config(tmp_path, tmp_path / "runs", "init.kind=wan", f"init.path={tmp_path / 'wan'}",
                     "astra.model.backbone.num_layers=3")  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"astra\.model\.backbone: does not match the Wan weights .*num_layers: 3 vs 2"
    ):
        check_model(config)
    check_model(_config(tmp_path, tmp_path / "runs", "init.kind=wan", f"init.path={tmp_path / 'wan'}"))


def test_workers_must_fit_the_cluster_unless_it_autoscales():
    from astra.config import ConfigError
    from astra.train.config import load_train_config
    from astra.train.run import worker_cpus

    gpus = ["preset=tiny", "parallel.workers=8", "parallel.use_gpu=true"]
    with pytest.raises(ConfigError, match=r"parallel\.workers: 8 GPU workers need 8 GPUs, the cluster has 0"):
        worker_cpus(load_train_config(None, gpus), {"CPU": 4.0})  # a head node before any GPU node
    assert worker_cpus(load_train_config(None, [*gpus, "parallel.fit_to_cluster=false"]), {"CPU": 4.0}) == 1.0
    assert worker_cpus(load_train_config(None, ["preset=tiny", "parallel.workers=2"]), {"CPU": 2.0}) == 1.0
    from astra.train.vae import load_vae_train_config  # the VAE job sizes its workers the same way

    assert (
        worker_cpus(load_vae_train_config(None, ["preset=tiny", "parallel.fit_to_cluster=false"]), {}) == 1.0
    )
    with pytest.raises(ConfigError, match=r"^parallel: 1 workers x 1 CPU"):
        worker_cpus(load_vae_train_config(None, ["preset=tiny", "parallel.cpus_per_worker=1"]), {"CPU": 0.5})


def test_local_weight_paths_are_made_absolute_before_the_workers_start(tmp_path, monkeypatch):
    """Ray Train workers run in folders of their own: a relative VAE or base path would not resolve there."""
    monkeypatch.chdir(tmp_path)
    config = resolve_paths(load_train_config(None, ["preset=tiny", "astra.vae.pretrained_path=weights/vae",
                                                    "init.kind=astra", "init.path=ckpt", "init.base=weights/wan"]))  # fmt: skip
    assert config.astra.vae.pretrained_path == str(tmp_path / "weights" / "vae")
    assert (config.init.path, config.init.base) == (str(tmp_path / "ckpt"), str(tmp_path / "weights" / "wan"))
    remote = resolve_paths(load_train_config(None, ["preset=tiny", "astra.vae.pretrained_path=s3://b/vae"]))
    assert remote.astra.vae.pretrained_path == "s3://b/vae"
