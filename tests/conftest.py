"""Shared fixtures: tiny configs and models (the same classes a GPU cluster runs, at toy sizes)."""

from __future__ import annotations

import os

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
def ray_local():
    """An in-process local Ray cluster shared by the session's `ray` tests (never `ray stop`)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
