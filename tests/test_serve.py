"""The rollout endpoint on a real Ray Serve (the in-process local Ray), over real HTTP on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import json
import math
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import av
import httpx
import numpy as np
import pytest
import torch
from conftest import free_port
from PIL import Image
from safetensors.torch import load_file

pytestmark = [pytest.mark.ray, pytest.mark.slow]
TOKEN = "test-token-4b1d"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_config_module):
    """A tiny Astra checkpoint whose experts are not zero, so actions change the chunks."""
    from astra.model import AstraTransformer, build_wan
    from astra.model.io import save_astra

    torch.manual_seed(0)
    model = AstraTransformer.from_wan(build_wan(tiny_config_module.model.backbone), tiny_config_module.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".moe." in name:
                p.add_(torch.randn_like(p) * 0.5)
    return save_astra(model, tmp_path_factory.mktemp("ckpt") / "astra")


@pytest.fixture(scope="module")
def tiny_config_module():
    from astra.config import preset

    return preset("tiny")


@pytest.fixture(scope="module")
def served(ray_local, checkpoint, tmp_path_factory):
    from ray import serve

    from serving.app import build

    sessions = tmp_path_factory.mktemp("sessions")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {
        "model.uri": str(checkpoint),
        "sessions.uri": str(sessions),
        "auth_token": TOKEN,
        "limits.max_body_bytes": 256 * 1024,
        "limits.max_image_pixels": 200 * 200,
        "replicas.min_replicas": 1,
        "replicas.max_replicas": 1,
        "replicas.num_cpus": 0.5,
        "replicas.batch_wait_timeout_s": 0.1,
    }
    serve.run(build(args), name="astra", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the Serve app did not become ready"
        time.sleep(1)
    yield SimpleNamespace(url=url, sessions=Path(sessions), args=args)
    serve.delete("astra")
    serve.shutdown()


def png(size=(64, 64), seed=0) -> str:
    pixels = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def create(served, seed=0, **extra) -> dict:
    body = {"prompt": "a green field", "modality": "camera", "seed": seed, "image_base64": png(seed=seed)} | extra
    r = httpx.post(f"{served.url}/v1/sessions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 201, r.text
    return r.json()


def sse_step(served, sid: str, body: dict) -> list[tuple[float, str, dict]]:
    """POST a step and read its server-sent events as they arrive: [(arrival time, event, data)]."""
    events, name = [], None
    with httpx.stream("POST", f"{served.url}/v1/sessions/{sid}/step", json=body, headers=AUTH, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((time.time(), name, json.loads(line[6:])))
    return events


def chunk_latents(served, sid: str, step: int) -> torch.Tensor:
    return load_file(str(served.sessions / sid / f"chunk-{step:06d}.safetensors"))["latents"]


def test_create_step_stream_video_and_fork(served):
    info = create(served)
    sid = info["session_id"]
    assert len(sid) == 22 and info["step"] == 0 and len(info["start_frames"]) == 1
    rows = [[1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, -0.3]] * 2  # forward along -Z, two latent frames
    keys = {"keys": [{"keys": ["W", "ArrowLeft"], "frames": 2}]}
    first = sse_step(served, sid, {"rows": rows})
    names = [e[1] for e in first]
    assert names == ["accepted", "frames", "frames", "done"], names
    frames_at, done = next(e for e in first if e[1] == "frames")[0], first[-1][2]
    assert frames_at < done["t"]  # the first frames reached us before the server had finished the step
    assert all(len(e[2]["frames"]) == 4 for e in first if e[1] == "frames")
    second = sse_step(served, sid, keys)
    assert second[-1][2]["session"]["step"] == 2
    third = httpx.post(f"{served.url}/v1/sessions/{sid}/step", json={**keys, "stream": False}, headers=AUTH,
                       timeout=120)  # fmt: skip
    assert third.status_code == 200 and len(third.json()["frames"]) == 8, third.text
    got = httpx.get(f"{served.url}/v1/sessions/{sid}", headers=AUTH).json()
    assert got["step"] == 3 and got["frames"] == 25 and got["latent_frames"] == 7

    video = httpx.get(f"{served.url}/v1/sessions/{sid}/video", headers=AUTH, timeout=60)
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    with av.open(io.BytesIO(video.content)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == 25 and decoded[0].shape == (64, 64, 3)

    fork = httpx.post(f"{served.url}/v1/sessions/{sid}/fork", json={"step": 1}, headers=AUTH)
    assert fork.status_code == 201, fork.text
    fid = fork.json()["session_id"]
    assert fork.json()["step"] == 1 and fork.json()["forked_from"] == {"session_id": sid, "step": 1}
    sse_step(served, fid, keys)
    sse_step(served, fid, {**keys})
    for step in (2, 3):  # the original's actions from the same state: bitwise the original's chunks
        assert torch.equal(chunk_latents(served, fid, step), chunk_latents(served, sid, step))
    other = create(served)  # the same seed and image, other actions: another rollout
    sse_step(served, other["session_id"], {"keys": [{"keys": ["S"], "frames": 2}]})
    assert not torch.equal(chunk_latents(served, other["session_id"], 1), chunk_latents(served, sid, 1))
