"""The remote modes end to end on one box, against `infra/local_stack.py` (a real S3-protocol server and a
real MLflow tracking server on loopback): encode to S3; train with S3 checkpoints and remote MLflow (FSDP2
on two workers, one of which dies once: the group resumes from S3; the run learns, is tracked, registers
its adapter); serve the registered version with sessions on S3."""

from __future__ import annotations

import base64
import io
import json
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pyarrow.fs as pafs
import pytest
import torch
from conftest import free_port, job_env
from mlflow.tracking import MlflowClient
from PIL import Image

from astra.config import ConfigError
from astra.data.storage import resolve
from astra.data.synthetic import write_dataset
from astra.encode.config import load_encode_config
from astra.encode.pipeline import run_encode
from astra.model import build_wan
from astra.model.io import load_astra
from astra.train.config import load_train_config, resolve_paths
from astra.train.dataset import plan_data
from astra.train.run import run_training
from astra.train.tracking import find_run

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """`python infra/local_stack.py` as a user starts it; yields what its ready line says."""
    folder = tmp_path_factory.mktemp("stack")
    log = folder / "stack.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "infra/local_stack.py", "--dir", str(folder)], cwd=ROOT,
                                env=job_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while "stack ready: " not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        ready = log.read_text().split("stack ready: ", 1)[1].split("\n", 1)[0]
        yield json.loads(ready)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert proc.returncode == 0 and "stack stopped" in log.read_text(), log.read_text()[-3000:]


def _png() -> str:
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def test_encode_train_serve_against_the_local_stack(stack, ray_local, tmp_path):
    from ray import serve

    from serving.app import build
    from serving.client import wait_ready

    s3_endpoint, tracking = stack["s3_endpoint"], stack["mlflow"]
    prefix = f"{stack['bucket']}/{uuid.uuid4().hex}"
    s3, _ = resolve(f"s3://{prefix}", s3_endpoint)

    # 1. encode: clips on local disk, the latent store on S3
    manifest = write_dataset(tmp_path / "clips", 12, "mixed", size=(64, 64), num_frames=33, fps=16.0, seed=11)
    encode = load_encode_config(None, ["preset=tiny", f"manifest={manifest}", f"store.uri=s3://{prefix}/store",
                                       f"store.s3_endpoint={s3_endpoint}"])  # fmt: skip
    assert run_encode(encode).encoded == 12

    # 2. train from the S3 store, checkpoints on S3, runs on the tracking server, FSDP2 over 2 workers in
    #    bf16; a worker dies once at step 5: Ray Train restarts the group from the last checkpoint
    #    registered (read back from S3)
    name = f"astra-stack-{uuid.uuid4().hex[:8]}"
    on_s3 = ["preset=tiny", f"data.store.uri=s3://{prefix}/store", f"data.store.s3_endpoint={s3_endpoint}",
             f"storage_path=s3://{prefix}/runs", f"storage_s3_endpoint={s3_endpoint}"]  # fmt: skip
    with pytest.raises(ConfigError, match=r"tracking\.tracking_uri: storage_path is remote"):
        resolve_paths(load_train_config(None, on_s3))  # no local default for a remote run's tracking
    config = resolve_paths(load_train_config(None, [
        *on_s3, f"tracking.tracking_uri={tracking}", f"tracking.register_as={name}", "log_every=1",
        "parallel.workers=2", "parallel.param_dtype=bfloat16", "parallel.max_failures=1", "max_steps=12",
        "checkpoint.every_steps=2", "fail_at_step=5", "eval_every=4", "sample_every=12", "optim.lr=3e-3",
    ]))  # fmt: skip
    result = run_training(config, plan_data(config, config.parallel.workers))
    assert result.error is None, result.error
    assert result.metrics["step"] == 12
    assert result.checkpoint.path.startswith(f"{prefix}/runs/{config.run_name}")
    stored = [i.path for i in s3.get_file_info(pafs.FileSelector(f"{prefix}/runs", recursive=True))]
    assert f"{prefix}/runs/{config.run_name}/fault-injected" in stored  # it did die once
    kept = [p for p in stored if p.endswith("train_state.json")]
    assert len(kept) == config.checkpoint.keep_last, kept  # keep-last-k
    # the step-4 checkpoint may be uploaded but never registered (the worker died before Ray Train's
    # controller collected the report): then the group restarts from step 2 and redoes 3..4; either way
    # no logged step is lost, and such an unregistered folder is deleted at the end (keep-last-k above)
    run = find_run(config)
    client = MlflowClient(tracking)
    runs = client.search_runs([run.info.experiment_id], f"tags.`astra.run_name` = '{config.run_name}'")
    assert len(runs) == 1  # the restarted group continued the run (its id came from the checkpoint)

    def history(key: str) -> list:
        return client.get_metric_history(run.info.run_id, key)

    counts = Counter(m.step for m in history("loss"))
    assert sorted(counts) == list(range(1, 13))
    redone = {step for step, n in counts.items() if n > 1}
    assert redone <= {3, 4} and max(counts.values()) == 1 + bool(redone)  # only steps after a checkpoint
    val = {m.step: m.value for m in history("val_loss")}
    assert sorted(val) == [4, 8, 12] and val[12] < val[4], val  # fixed sigmas and noise: it learns
    for key in ("lr", "grad_norm", "samples_per_s", "tokens_per_s", "peak_memory_gib"):
        assert {m.step for m in history(key)} == set(range(1, 13)), key
    tags, params = run.data.tags, run.data.params
    assert tags["astra.frozen_unchanged"] == "true"  # gathered back from FSDP2 shards, compared bitwise
    assert params["optim.lr"] == "0.003" and params["parallel.workers"] == "2"
    assert len(tags["astra.git_revision"]) in (40, 7) or tags["astra.git_revision"] == "unknown"
    assert tags["astra.encode_hash"] and tags["astra.config_hash"]
    samples = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert samples == ["samples/sample-step0000012.mp4"]
    # the registered version: safetensors + config (no pickle), with the store's action statistics
    assert tags["astra.registered_model"] == f"models:/{name}/1"
    assert client.get_model_version(name, "1").run_id == run.info.run_id
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1", tracking_uri=tracking,
                                                      dst_path=str(tmp_path / "registered")))  # fmt: skip
    assert not list(folder.rglob("*.pkl"))
    torch.manual_seed(config.init.seed)
    adapter = next(folder.rglob("adapter.safetensors")).parent
    model = load_astra(adapter, base=build_wan(config.astra.model.backbone))
    assert int(model.action_encoder.action_count.sum()) > 0
    # the tracking server keeps the artifacts on the S3 server (proxied: the job never wrote them there)
    artifacts = [
        i.path for i in s3.get_file_info(pafs.FileSelector(f"{stack['bucket']}/mlflow", recursive=True))
    ]
    assert any(p.endswith("adapter.safetensors") for p in artifacts), artifacts[:20]

    # 3. serve the registered version (downloaded from the tracking server), sessions on S3
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        args = {"preset": "tiny", "model.uri": f"models:/{name}/1", "model.tracking_uri": tracking,
                "model.cache_dir": str(tmp_path / "serve-cache"), "sessions.uri": f"s3://{prefix}/sessions",
                "sessions.s3_endpoint": s3_endpoint}  # fmt: skip
        serve.run(build(args), name="stack", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        body = {"prompt": "a green field", "modality": "camera", "seed": 0, "image_base64": _png()}
        created = httpx.post(f"{url}/v1/sessions", json=body, timeout=120)
        assert created.status_code == 201, created.text
        sid = created.json()["session_id"]
        chunk = httpx.get(f"{url}/v1/config", timeout=30).json()["chunk_latents"]
        step = httpx.post(f"{url}/v1/sessions/{sid}/step", json={"keys": [{"keys": ["W"], "frames": chunk}],
                                                                  "stream": False}, timeout=120)  # fmt: skip
        assert step.status_code == 200, step.text
        assert len(step.json()["frames"]) == 4 * chunk and step.json()["session"]["step"] == 1
    finally:
        serve.delete("stack")
        serve.shutdown()
    sessions = [i.path for i in s3.get_file_info(pafs.FileSelector(f"{prefix}/sessions", recursive=True))]
    assert any(sid in p for p in sessions), sessions  # the session's state lives on S3
