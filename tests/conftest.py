"""Shared fixtures: tiny configs and models (the same classes a GPU cluster runs, at toy sizes)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


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
