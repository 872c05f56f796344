"""The rollout endpoint on a real Ray Serve (the in-process local Ray), over real HTTP on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import json
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
def checkpoint(acting_checkpoint):
    return acting_checkpoint


@pytest.fixture(scope="module")
def served(ray_local, checkpoint, tmp_path_factory):
    from ray import serve

    from serving.app import build
    from serving.client import wait_ready

    sessions = tmp_path_factory.mktemp("sessions")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {
        "model.uri": str(checkpoint),
        "sessions.uri": str(sessions),
        "auth_token": TOKEN,
        "limits.max_body_bytes": 256 * 1024,
        "limits.max_image_pixels": 200 * 200,
        # autoscaling between 1 and 2 replicas, quickly (the scale test drives it; other tests' load may)
        "replicas.min_replicas": 1,
        "replicas.max_replicas": 2,
        "replicas.target_ongoing_requests": 1,
        "replicas.upscale_delay_s": 1,
        "replicas.downscale_delay_s": 4,
        "replicas.look_back_period_s": 2,
        "replicas.num_cpus": 0.5,
        "replicas.batch_wait_timeout_s": 0.1,
    }
    serve.run(build(args), name="astra", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url)
    yield SimpleNamespace(url=url, sessions=Path(sessions), args=args)
    serve.delete("astra")
    serve.shutdown()


def png(size=(64, 64), seed=0) -> str:
    pixels = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def create(served, seed=0, **extra) -> dict:
    body = {
        "prompt": "a green field",
        "modality": "camera",
        "seed": seed,
        "image_base64": png(seed=seed),
    } | extra
    r = httpx.post(f"{served.url}/v1/sessions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 201, r.text
    return r.json()


def sse_step(served, sid: str, body: dict) -> list[tuple[float, str, dict]]:
    """POST a step and read its server-sent events as they arrive: [(arrival time, event, data)]."""
    events, name = [], None
    with httpx.stream(
        "POST", f"{served.url}/v1/sessions/{sid}/step", json=body, headers=AUTH, timeout=120
    ) as r:
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
    clip = io.BytesIO()  # a start clip instead of an image: its first 1 + 4k frames are the history
    from astra.data.video import encode_mp4

    encode_mp4(np.random.default_rng(0).integers(0, 255, (9, 64, 64, 3), dtype=np.uint8), clip, fps=16.0)
    from_clip = create(served, image_base64=None, clip_base64=base64.b64encode(clip.getvalue()).decode())
    assert from_clip["latent_frames"] == 3 and len(from_clip["start_frames"]) == 9
    upload = httpx.post(f"{served.url}/v1/sessions/upload", headers=AUTH, timeout=60,
                        data={"prompt": "a road", "modality": "driving", "seed": "1"},
                        files={"image": ("start.png", base64.b64decode(png()), "image/png")})  # fmt: skip
    assert upload.status_code == 201 and upload.json()["modality"] == "driving", upload.text
    drive = sse_step(
        served, upload.json()["session_id"], {"drive": [{"throttle": 8.0, "steer": 0.2, "frames": 2}]}
    )
    assert drive[-1][1] == "done" and drive[-1][2]["session"]["step"] == 1
    assert (
        httpx.get(f"{served.url}/docs").status_code == 200 and httpx.get(f"{served.url}/healthz").json()["ok"]
    )
    other = create(served)  # the same seed and image, other actions: another rollout
    sse_step(served, other["session_id"], {"keys": [{"keys": ["S"], "frames": 2}]})
    assert not torch.equal(chunk_latents(served, other["session_id"], 1), chunk_latents(served, sid, 1))


def test_bad_requests_get_a_4xx_naming_the_field(served):
    from astra.rollout.store import SessionStore

    sid = create(served)["session_id"]
    expired = create(served)["session_id"]
    SessionStore(str(served.sessions)).touch(expired, ttl_s=-1)
    url, step = served.url, f"/v1/sessions/{sid}/step"
    big = Image.new("RGB", (300, 300))  # 90,000 pixels > limits.max_image_pixels (40,000)
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    body = {"prompt": "p", "image_base64": png()}
    cases = [
        ("wrong action dims", "POST", step, {"json": {"rows": [[0.0] * 5] * 2}}, 422, "rows: every row needs 12 numbers"),
        ("wrong row count", "POST", step, {"json": {"rows": [[0.0] * 12] * 3}}, 422, "actions: expected shape (2, 12)"),
        ("NaN action", "POST", step, {"content": '{"rows": [[NaN, 0,0,0,0,0,0,0,0,0,0,0], [0,0,0,0,0,0,0,0,0,0,0,0]]}',
                                      "headers": {"content-type": "application/json"}}, 422, "actions: contains NaN"),
        ("two kinds of actions", "POST", step, {"json": {"rows": [[0.0] * 12] * 2, "keys": []}}, 422, "rows: give exactly one"),
        ("too many commands", "POST", step, {"json": {"keys": [{"keys": ["W"]}] * 65}}, 422, "keys: more than limits.max_commands"),
        ("commands too short", "POST", step, {"json": {"keys": [{"keys": ["W"], "frames": 1}]}}, 422, "commands: the commands last 1"),
        ("unknown key", "POST", step, {"json": {"keys": [{"keys": ["Z"], "frames": 2}]}}, 422, "keys.0.keys.0"),
        ("drive on camera", "POST", step, {"json": {"drive": [{"throttle": 3, "frames": 2}]}}, 422, "drive: driving commands need"),
        ("stale expected_step", "POST", step, {"json": {"rows": [[0.0] * 12] * 2, "expected_step": 5}}, 409, "expected_step: the session is at step 0"),
        ("unknown modality", "POST", "/v1/sessions", {"json": body | {"modality": "submarine"}}, 422, "modality: unknown 'submarine'"),
        ("no image", "POST", "/v1/sessions", {"json": {"prompt": "p"}}, 422, "image_base64: a start image"),
        ("empty image", "POST", "/v1/sessions", {"json": {"prompt": "p", "image_base64": ""}}, 422, "image_base64: empty"),
        ("not base64", "POST", "/v1/sessions", {"json": {"prompt": "p", "image_base64": "%%%"}}, 422, "image_base64: not valid base64"),
        ("non-image bytes", "POST", "/v1/sessions", {"json": {"prompt": "p", "image_base64": base64.b64encode(b"hello").decode()}},
         422, "image_base64: not a readable PNG or JPEG"),
        ("huge image", "POST", "/v1/sessions", {"json": {"prompt": "p", "image_base64": base64.b64encode(buf.getvalue()).decode()}},
         422, "image_base64: 300x300 pixels exceed limits.max_image_pixels"),
        ("bad clip", "POST", "/v1/sessions", {"json": {"prompt": "p", "clip_base64": base64.b64encode(b"\0" * 99).decode()}},
         422, "clip_base64: not a readable video"),
        ("long prompt", "POST", "/v1/sessions", {"json": body | {"prompt": "x" * 2001}}, 422, "prompt: longer than limits.max_prompt_chars"),
        ("sampler out of range", "POST", "/v1/sessions", {"json": body | {"sampler": {"num_steps": 500}}}, 422, "sampler.num_steps: must be within"),
        ("unknown field", "POST", "/v1/sessions", {"json": body | {"colour": 1}}, 422, "colour: Extra inputs are not permitted"),
        ("malformed JSON", "POST", "/v1/sessions", {"content": "{not json", "headers": {"content-type": "application/json"}}, 422, "body: not valid JSON"),
        ("oversized chunked body", "POST", "/v1/sessions", {"content": (b"x" * 65536 for _ in range(5)),
                                                              "headers": {"content-type": "application/json"}}, 413,
         "body: larger than limits.max_body_bytes"),
        ("uneven rows", "POST", step, {"json": {"rows": [[0.0] * 12, [0.0] * 5]}}, 422, "rows: every row needs"),
        ("upload seed overflow", "POST", "/v1/sessions/upload", {"data": {"prompt": "p", "seed": str(2**70)}}, 422, "seed:"),
        ("oversized body", "POST", "/v1/sessions", {"json": {"prompt": "p", "image_base64": "A" * 300_000}}, 413, "body: larger than limits.max_body_bytes"),
        ("unknown session", "GET", "/v1/sessions/AAAAAAAAAAAAAAAAAAAAAA", {}, 404, "session_id: no session"),
        ("malformed session id", "GET", "/v1/sessions/abc", {}, 404, "session_id: no session"),
        ("a path that is no route", "GET", "/v1/sessions/..%2F..%2Fetc", {}, 404, "path: /v1/"),
        ("expired session", "POST", f"/v1/sessions/{expired}/step", {"json": {"rows": [[0.0] * 12] * 2}}, 410, "session_id: session"),
        ("fork past the end", "POST", f"/v1/sessions/{sid}/fork", {"json": {"step": 9}}, 422, "step: session"),
        ("missing token", "GET", f"/v1/sessions/{sid}", {"headers": {}}, 401, "authorization: missing or wrong bearer token"),
        ("wrong token", "GET", f"/v1/sessions/{sid}", {"headers": {"authorization": "Bearer nope"}}, 401, "authorization:"),
    ]  # fmt: skip
    wrong = []
    for name, method, path, kwargs, status, message in cases:
        headers = kwargs.pop("headers", {}) | ({} if name.endswith("token") else AUTH)
        r = httpx.request(method, url + path, headers=headers, timeout=60, **kwargs)
        error = (
            r.json().get("error", "")
            if r.headers.get("content-type", "").startswith("application/json")
            else r.text
        )
        if r.status_code != status or message not in error:
            wrong.append((name, r.status_code, error[:200]))
    assert not wrong, wrong
    assert httpx.get(f"{url}/v1/sessions/{sid}", headers=AUTH).json()["step"] == 0  # nothing was lost


def test_concurrent_steps_of_one_session_one_wins_the_other_409(served):
    sid = create(served, sampler={"num_steps": 40})["session_id"]  # slow enough to overlap
    results = []

    def step():
        r = httpx.post(f"{served.url}/v1/sessions/{sid}/step", headers=AUTH, timeout=120,
                       json={"rows": [[0.0] * 12] * 2, "stream": False})  # fmt: skip
        results.append((r.status_code, r.json()))

    threads = [threading.Thread(target=step) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(code for code, _ in results) == [200, 409], results
    assert "session_id: a step of session" in next(body["error"] for code, body in results if code == 409)
    assert httpx.get(f"{served.url}/v1/sessions/{sid}", headers=AUTH).json()["step"] == 1  # one history


def test_openapi_fuzz_finds_no_server_error(served):
    """Schemathesis draws requests from the app's own OpenAPI spec, every other one aimed at a real
    session (so step / fork / video validation runs on live state, not just the 404 of a random id):
    none may get a 5xx."""
    import itertools

    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(f"{served.url}/openapi.json")
    failures: list[tuple] = []
    real = itertools.count()
    sessions = [create(served, seed=70 + i)["session_id"] for i in range(2)]

    def fuzz(operation):
        @settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case):
            if "session_id" in (case.path_parameters or {}) and next(real) % 2 == 0:
                # a real session; DELETE gets one of its own so the others stay
                delete = case.method.upper() == "DELETE"
                case.path_parameters["session_id"] = create(served)["session_id"] if delete else sessions[0]
            response = case.call(base_url=served.url, headers=AUTH, timeout=120)
            if response.status_code >= 500:
                failures.append((operation.label, response.status_code, response.text[:200]))

        return check

    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9  # every route of the API, not just a few
    for operation in operations:
        fuzz(operation)()
    assert not failures, failures[:5]
    assert httpx.get(f"{served.url}/v1/sessions/{sessions[1]}", headers=AUTH).status_code == 200


def _replicas() -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith("SERVE_REPLICA::astra#ChunkGenerator"))  # fmt: skip


def test_a_killed_replica_loses_nothing_and_the_session_continues_bitwise(served):
    import ray

    keys = [{"keys": [{"keys": [k], "frames": 2}]} for k in ("W", "ArrowLeft", "D")]
    reference = create(served, seed=3)["session_id"]
    want = [sse_step(served, reference, k) for k in keys]
    sid = create(served, seed=3)["session_id"]
    got = [sse_step(served, sid, keys[0])]
    replica = got[0][-1][2]["replica"]
    (name,) = [n for n in _replicas() if n.endswith(replica)]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    got += [sse_step(served, sid, k) for k in keys[1:]]  # waits for a replica, then continues
    assert all(g[-1][2]["replica"] != replica for g in got[1:])  # another replica served it
    for step in (1, 2, 3):
        assert torch.equal(chunk_latents(served, sid, step), chunk_latents(served, reference, step))
    for w, g in zip(want, got, strict=True):  # the decoder cache, rebuilt on the new replica, is exact too
        assert [e[2]["frames"] for e in w if e[1] == "frames"] == [
            e[2]["frames"] for e in g if e[1] == "frames"
        ]


def test_eight_concurrent_sessions_batch_and_match_one_at_a_time(served):
    ids = [create(served, seed=10 + i)["session_id"] for i in range(8)]
    moves = ["W", "A", "D"]
    failures, batches = [], []

    def drive(sid: str):
        for key in moves:
            r = httpx.post(f"{served.url}/v1/sessions/{sid}/step", headers=AUTH, timeout=300,
                           json={"keys": [{"keys": [key], "frames": 2}]})  # fmt: skip
            if r.status_code != 200 or "event: done" not in r.text:
                failures.append((sid, r.status_code, r.text[-300:]))
            else:
                done = json.loads(r.text.split("event: done\ndata: ")[1].split("\n")[0])
                batches.append(done["batch"])

    threads = [threading.Thread(target=drive, args=(sid,)) for sid in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    assert max(batches) > 1, batches  # steps of different sessions did share denoising loops
    for i, sid in enumerate(ids):  # the same session alone, one step at a time
        alone = create(served, seed=10 + i)["session_id"]
        for key in moves:
            sse_step(served, alone, {"keys": [{"keys": [key], "frames": 2}]})
        for step in (1, 2, 3):
            # equal up to float reassociation: batched matrix kernels block by shape (see service.py)
            torch.testing.assert_close(chunk_latents(served, sid, step), chunk_latents(served, alone, step),
                                       atol=1e-5, rtol=0)  # fmt: skip


def _wait_for_replicas(count: int, timeout: float = 180) -> None:
    """Until exactly ``count`` generator replicas are running (and no other states), plus a moment for
    the routers' rings to hear of them."""
    from ray import serve

    deadline = time.monotonic() + timeout
    while True:
        states = serve.status().applications["astra"].deployments["ChunkGenerator"].replica_states
        if states == {"RUNNING": count} and len(_replicas()) == count:
            break
        assert time.monotonic() < deadline, states
        time.sleep(0.5)
    time.sleep(2)


def test_scale_up_and_down_never_continues_stale_state(served):
    def step(sid: str, key: str) -> str:
        events = sse_step(served, sid, {"keys": [{"keys": [key], "frames": 2}]})
        return events[-1][2]["replica"]

    moves = ["W", "A", "D"]
    ids = [create(served, seed=40 + i)["session_id"] for i in range(8)]
    _wait_for_replicas(1)  # idle: the autoscaler's minimum
    served_by = {sid: [step(sid, moves[0])] for sid in ids}  # one replica: it caches every session at 1
    load_ids = [create(served, seed=90 + i, sampler={"num_steps": 40})["session_id"] for i in range(4)]
    stop = threading.Event()

    def load(sid: str):  # slow steps keep more requests in flight than target_ongoing_requests
        while not stop.is_set():
            httpx.post(f"{served.url}/v1/sessions/{sid}/step", headers=AUTH, timeout=300,
                       json={"rows": [[1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0]] * 2, "stream": False})  # fmt: skip

    threads = [threading.Thread(target=load, args=(sid,)) for sid in load_ids]
    for t in threads:
        t.start()
    try:
        _wait_for_replicas(2)  # scaled up under load
        for sid in ids:
            served_by[sid].append(step(sid, moves[1]))  # some sessions move to the new replica
    finally:
        stop.set()
        for t in threads:
            t.join()
    _wait_for_replicas(1)  # idle again: scaled down
    for sid in ids:
        served_by[sid].append(step(sid, moves[2]))
    came_back = [sid for sid, r in served_by.items() if r[0] == r[2] != r[1]]
    assert came_back, served_by  # sessions returned to a replica holding their step-1 state
    for i, sid in enumerate(ids):  # every chunk is the uninterrupted session's, bitwise
        alone = create(served, seed=40 + i)["session_id"]
        for key in moves:
            step(alone, key)
        for k in (1, 2, 3):
            assert torch.equal(chunk_latents(served, sid, k), chunk_latents(served, alone, k)), (sid, k)


def test_web_player_in_a_real_headless_chromium(served, tmp_path):
    """The page at / in Debian's chromium (driven by Playwright): start a session, press W, the step
    counter and the shown frames advance, the picture changes; a screenshot is saved."""
    import os
    import shutil

    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: apt-get install -y chromium (.ci/run does)")
        pytest.skip("no chromium (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(served.url + "/")
            page.fill("#token", TOKEN)
            page.click("#start", timeout=120_000)  # waits for the button: enabled once /v1/config answered
            try:
                page.wait_for_function("document.getElementById('step').textContent === '0'", timeout=180_000)
            except Exception as err:  # say what the page showed, not only that it timed out
                raise AssertionError(
                    (page.text_content("#status"), page.text_content("#error"), errors)
                ) from err
            page.wait_for_function("Number(document.getElementById('frames').textContent) >= 1")
            before = page.get_attribute("#screen", "src")
            page.click("h1")  # focus off the inputs, as a user would
            page.keyboard.press("w")
            page.wait_for_function("document.getElementById('step').textContent === '1'", timeout=120_000)
            page.wait_for_function("Number(document.getElementById('frames').textContent) >= 9")  # 1 + 8
            after = page.get_attribute("#screen", "src")
            shot = tmp_path / "player.png"
            page.screenshot(path=str(shot))
            assert page.text_content("#error") == "" and not errors, (page.text_content("#error"), errors)
        finally:
            browser.close()
    assert after != before and after.startswith("data:image/jpeg;base64,")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 1000
    print(f"screenshot: {shot}")
