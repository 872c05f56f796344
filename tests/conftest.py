"""Shared fixtures: tiny configs and models (the same classes a GPU cluster runs, at toy sizes)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# credentials of the loopback S3 server; set before any Ray cluster starts so its workers inherit them
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_config():
    from astra.config import preset

    return preset("tiny")


@pytest.fixture
def tiny_wan(tiny_config):
    from astra.model import build_wan

    torch.manual_seed(0)
    return build_wan(tiny_config.model.backbone).eval()


@pytest.fixture
def tiny_model(tiny_config, tiny_wan):
    from astra.model import AstraTransformer

    return AstraTransformer.from_wan(tiny_wan, tiny_config.model).eval()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto's standalone server) on loopback; yields its endpoint URL."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="astra")
    yield endpoint
    server.stop()


@pytest.fixture
def store_config(request, tmp_path, s3_server):
    """A StorageConfig on a local folder or on the S3 server (parametrise with 'local' / 's3')."""
    import uuid

    from astra.data.storage import StorageConfig

    if getattr(request, "param", "local") == "s3":
        return StorageConfig(uri=f"s3://astra/{uuid.uuid4().hex}", s3_endpoint=s3_server)
    return StorageConfig(uri=str(tmp_path / "store"))


@pytest.fixture(scope="session")
def acting_checkpoint(tmp_path_factory):
    """A tiny full Astra checkpoint whose experts are not zero, so actions change the chunks."""
    import torch

    from astra.config import preset
    from astra.model import AstraTransformer, build_wan
    from astra.model.io import save_astra

    cfg = preset("tiny")
    torch.manual_seed(0)
    model = AstraTransformer.from_wan(build_wan(cfg.model.backbone), cfg.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".moe." in name:
                p.add_(torch.randn_like(p) * 0.5)
    return save_astra(model, tmp_path_factory.mktemp("ckpt") / "astra")


@pytest.fixture(scope="session")
def ray_local():
    """An in-process local Ray cluster shared by the session's `ray` tests (never `ray stop`)."""
    import ray

    from astra.runtime import quiet_ray_logs

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    quiet_ray_logs()
    yield ray
    ray.shutdown()


# ----------------------------------------------------------------------------- job processes and a head node


def job_env(pin_auth: bool = True, **extra: str) -> dict:
    """Environment for a job or `ray` CLI subprocess (this venv's binaries first on PATH). With
    ``pin_auth=False`` Ray decides authentication itself, as it does for a user."""
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    if pin_auth:
        env.setdefault("RAY_AUTH_MODE", "disabled")
    else:
        env.pop("RAY_AUTH_MODE", None)
    env.update(extra)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def kill_session(sid: int) -> None:
    """SIGKILL every process of a session: a job's driver and the local Ray it started (Ray workers
    sit in process groups of their own, so killing the driver's group is not enough)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # field 6 of /proc/<pid>/stat: the session id
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(stat.parent.name), signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RAY_BIN = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """The README's cluster steps: token auth (`RAY_AUTH_MODE=token`, `ray get-auth-token --generate`,
    in a HOME of its own so no real token is touched), then `ray start --head --num-cpus=2` (this box's
    real size) on ports of its own. Yields (dashboard address, environment for the `ray` CLI). Stopped
    by killing its own session (never `ray stop`)."""
    env = job_env(pin_auth=False, RAY_AUTH_MODE="token", HOME=str(tmp_path_factory.mktemp("home")))
    subprocess.run([RAY_BIN, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    port, dash = free_port(), free_port()
    # short: Ray's socket paths have a length limit that pytest's tmp_path can exceed
    temp = Path(tempfile.gettempdir()) / f"ray-astra-{os.getpid()}-{port}"
    # every port of its own, so it never collides with another cluster on this machine (e.g. the
    # in-process one of the other ray tests): a taken agent port leaves the head without a job agent
    own_ports = [
        f"--{name}={free_port()}"
        for name in (
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "runtime-env-agent-port",
            "node-manager-port",
            "object-manager-port",
            "ray-client-server-port",
        )
    ]
    head = subprocess.Popen(
        [
            RAY_BIN,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            f"--dashboard-port={dash}",
            "--dashboard-host=127.0.0.1",
            "--num-cpus=2",
            f"--temp-dir={temp}",
            "--include-dashboard=true",
            *own_ports,
        ],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # up, and asking for the token: fine
                break
            except OSError:
                assert time.monotonic() < deadline and head.poll() is None, "ray head did not come up"
                time.sleep(1)
        yield address, env
    finally:
        kill_session(head.pid)
        head.wait(30)
        shutil.rmtree(temp, ignore_errors=True)


def submit_job(head, *entrypoint: str, working_dir: Path | None = None, timeout: int = 400):
    """`ray job submit --address ADDRESS [--working-dir DIR] -- ENTRYPOINT` against the ``ray_head``
    fixture's cluster, with its environment (waits for the job)."""
    address, env = head
    cmd = [RAY_BIN, "job", "submit", "--address", address]
    if working_dir is not None:
        cmd += ["--working-dir", str(working_dir)]
    cmd += ["--", *entrypoint]
    deadline = time.monotonic() + 90
    while True:
        job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        # the dashboard answers before the head's job agent has registered: retry that case only
        if "No available agent" not in job.stderr or time.monotonic() > deadline:
            return job
        time.sleep(2)
