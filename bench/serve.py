"""Serving: HTTP step latency vs the in-process engine; chunk 10 vs chunk 2 latency; 4 sessions batched
vs one at a time.

    python bench/serve.py [--steps 4] [--size 64x64]

One model for everything: a small Astra (4 blocks of width 128, the paper's FramePack layout: an
8-latent target, 1 + 1 at 1x, 2 at 2x, 16 at 4x) at 64x64, 10 sampler steps with AFG, so a chunk is
compute rather than overhead (the tiny VAE's decode costs ~0.1 s per latent here). The in-process variant is ``RolloutService`` (checkout, denoise, commit
to the session store, decode latent by latent, JPEG) — exactly what a replica runs; the HTTP variant
is the same service behind the Serve app (ingress + one generator replica of 1 CPU) on 127.0.0.1,
steps streamed as server-sent events. Ray gives a 1-CPU replica one torch thread (OMP_NUM_THREADS),
so this process computes with one thread too: the ratio is the serving overhead, not a thread count. Latencies are medians. Ratios, the batched throughput last:

  http / in-process step latency    (goal <= 1.1)
  chunk 10 / chunk 2 denoising      (FramePack keeps a chunk's cost flat: goal <= 1.1)
  4 sessions batched / sequential   (throughput; denoising shares one loop)
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `serving` lives beside `bench`

from astra.rollout.commands import KeyCommand
from astra.rollout.config import serve_config_from_args
from astra.rollout.media import jpeg
from astra.rollout.service import RolloutService

MODEL = {
    "astra.model.backbone.num_layers": 4,
    "astra.model.backbone.num_attention_heads": 4,
    "astra.model.backbone.attention_head_dim": 32,
    "astra.model.backbone.ffn_dim": 512,
    "astra.model.framepack.target_frames": 8,
    "astra.model.framepack.recent_frames": 1,
    "astra.model.framepack.frames_2x": 2,
    "astra.model.framepack.frames_4x": 16,
    "astra.sampler.num_steps": 10,
}


def image(size: tuple[int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (1, *size, 3), dtype=np.uint8)


def local_step(service: RolloutService, sid: str, decode: bool = True) -> tuple[float, float]:
    """One step as a replica runs it: (total seconds, of which denoising). ``decode=False`` skips the
    frames (the session still advances)."""
    start = time.perf_counter()
    live = service.checkout(sid)
    try:
        rows = service.actions(live, keys=[KeyCommand(keys=("W",), frames=service.chunk_latents)])
        (after,) = service.generate([(live, rows)])
        denoised = time.perf_counter() - start
        added = service.commit(live, after)
        if decode:
            for frames in service.stream(live, added):
                [jpeg(frame, 85) for frame in frames]  # decoded and encoded, as a replica serves them
    finally:
        service.release(sid)
    return time.perf_counter() - start, denoised


def http_step(url: str, sid: str, chunk: int) -> float:
    start = time.perf_counter()
    body = {"keys": [{"keys": ["W"], "frames": chunk}]}
    with httpx.stream("POST", f"{url}/v1/sessions/{sid}/step", json=body, timeout=600) as r:
        assert r.status_code == 200, r.read()
        for _ in r.iter_lines():
            pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", default="64x64")
    args = parser.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    torch.set_num_threads(1)  # as the 1-CPU replica computes (see the module docstring)
    with tempfile.TemporaryDirectory() as tmp:
        settings = {**MODEL, "height": h, "width": w, "sessions.uri": str(Path(tmp) / "sessions")}
        service = RolloutService(serve_config_from_args(settings))
        chunk = service.chunk_latents

        # 1. in-process steps (first one warms up)
        sid = service.create("bench-local-0000000000", "a field", "camera", 0, image((h, w), 0))[0][
            "session_id"
        ]
        local = [local_step(service, sid)[0] for _ in range(args.steps + 1)][1:]
        print(f"in-process: median step {statistics.median(local) * 1e3:.0f} ms over {args.steps} steps")

        # 2. denoising of chunk 2 vs chunk 10 of fresh sessions (what FramePack bounds; the decode of a
        # chunk costs the same at any length), median over 3 sessions
        per_chunk: dict[int, list[float]] = {2: [], 10: []}
        for s in range(3):
            sid = service.create(f"bench-chunks-{s:09d}", "a field", "camera", s, image((h, w), s))[0][
                "session_id"
            ]
            for k in range(1, 11):
                _, denoised = local_step(service, sid, decode=False)
                if k in per_chunk:
                    per_chunk[k].append(denoised)
        c2, c10 = (statistics.median(per_chunk[k]) for k in (2, 10))
        print(f"denoising chunk 2: {c2 * 1e3:.0f} ms, chunk 10: {c10 * 1e3:.0f} ms")

        # 3. four sessions: one denoising loop vs four
        ids = [service.create(f"bench-batch-{i:010d}", "a field", "camera", i, image((h, w), i))[0]["session_id"]
               for i in range(4)]  # fmt: skip
        for sid in ids:  # the same window shape for all four
            local_step(service, sid, decode=False)

        def denoise(groups: list[list[str]]) -> float:
            start = time.perf_counter()
            for group in groups:
                lives = [service.checkout(sid) for sid in group]
                rows = [service.actions(lv, keys=[KeyCommand(keys=("W",), frames=chunk)]) for lv in lives]
                service.generate(list(zip(lives, rows, strict=True)))
                for sid in group:
                    service.release(sid)
            return time.perf_counter() - start

        sequential = statistics.median(denoise([[sid] for sid in ids]) for _ in range(3))
        batched = statistics.median(denoise([ids]) for _ in range(3))
        print(f"4 sessions: sequential {sequential * 1e3:.0f} ms, batched {batched * 1e3:.0f} ms")

        # 4. the same over HTTP: the Serve app on a local Ray
        import ray
        from ray import serve

        from serving.app import build
        from serving.client import wait_ready

        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        port = 8123
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build(settings | {"replicas.max_replicas": 1, "replicas.num_cpus": 1}), name="bench",
                  route_prefix="/", blocking=False)  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, timeout_s=300)
        out = io.BytesIO()
        Image.fromarray(image((h, w), 0)[0]).save(out, format="PNG")
        body = {"prompt": "a field", "image_base64": base64.b64encode(out.getvalue()).decode()}
        sid = httpx.post(f"{url}/v1/sessions", json=body, timeout=300).json()["session_id"]
        remote = [http_step(url, sid, chunk) for _ in range(args.steps + 1)][1:]
        print(f"http: median step {statistics.median(remote) * 1e3:.0f} ms over {args.steps} steps")
        serve.shutdown()
        ray.shutdown()

        print(f"http / in-process step latency: {statistics.median(remote) / statistics.median(local):.2f}")
        print(f"chunk 10 / chunk 2 denoising latency: {c10 / c2:.2f}")
        print(f"4 sessions batched / sequential throughput: {sequential / batched:.2f}")


if __name__ == "__main__":
    main()
