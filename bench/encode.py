"""Encode throughput: the Ray Data job vs a plain in-process loop over the same stages and clips.

    python bench/encode.py [--clips 32] [--size 128x128] [--frames 33] [--vae-actors 1]

Both variants run in this process on the same synthetic clips and write to their own store. Each is
timed end to end and in steady state (after its models are loaded / its first clip came out). The
last line is the steady-state throughput ratio, Ray Data / loop (goal on a 2-core box: >= 0.9); the
end-to-end ratio before it shows what the one-off start-up costs at this job size.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import ray

from astra.data.manifest import read_manifest
from astra.data.synthetic import write_dataset
from astra.encode.config import load_encode_config
from astra.encode.decode import decode_windows_of
from astra.encode.pipeline import run_encode
from astra.encode.prompts import PromptEmbedder
from astra.encode.vae import VAEEncoder
from astra.encode.writer import ShardWriter
from astra.runtime import RayConfig, connect


def loop_encode(config) -> tuple[float, float]:
    """The same stages, called one after the other in this process, no Ray.
    Returns (end-to-end seconds, start-up seconds spent loading the models)."""
    start = time.perf_counter()
    records, _ = read_manifest(config.manifest)
    vae, prompts, writer = VAEEncoder(config), PromptEmbedder(config), ShardWriter(config)
    startup = time.perf_counter() - start
    done, size = 0, config.compute.vae_batch_size
    for i in range(0, len(records), size):
        rows = [w for r in records[i : i + size] for w in decode_windows_of(r.model_dump(), config)]
        batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
        out = writer(prompts(vae(batch)))
        done += int(np.sum(out["status"] == "encoded"))
    elapsed = time.perf_counter() - start
    assert done == len(records), f"loop encoded {done} of {len(records)}"
    return elapsed, startup


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--clips", type=int, default=256, help="enough for start-up to amortise, as in real jobs"
    )
    parser.add_argument("--size", default="128x128")
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument(
        "--vae-actors",
        type=int,
        default=2,
        help="VAE actors (one per accelerator; on a CPU box one per core)",
    )
    args = parser.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = write_dataset(
            tmp / "clips", args.clips, "mixed", size=(h, w), num_frames=args.frames, fps=16.0, seed=0
        )
        common = [
            "preset=tiny",
            f"manifest={manifest}",
            f"video.height={h}",
            f"video.width={w}",
            f"video.max_frames={args.frames}",
            f"video.min_frames={args.frames}",
        ]
        loop_cfg = load_encode_config(None, [*common, f"store.uri={tmp / 'loop'}"])
        ray_cfg = load_encode_config(
            None, [*common, f"store.uri={tmp / 'ray'}", f"compute.vae_actors={args.vae_actors}"]
        )

        loop_s, loop_startup = loop_encode(loop_cfg)
        loop_steady = args.clips / (loop_s - loop_startup)
        print(
            f"loop:     {args.clips} clips in {loop_s:.1f} s = {args.clips / loop_s:.2f} clips/s "
            f"(start-up {loop_startup:.1f} s, then {loop_steady:.2f} clips/s)"
        )

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        connect(RayConfig())  # the job's own local cluster: one logical CPU per core
        try:
            start = time.perf_counter()
            summary = run_encode(ray_cfg)
            ray_s = time.perf_counter() - start
        finally:
            ray.shutdown()
        assert summary.encoded == args.clips, summary.line()
        steady = (summary.encoded - 1) / max(summary.wall_seconds - summary.first_result_seconds, 1e-9)
        print(
            f"ray data: {args.clips} clips in {ray_s:.1f} s = {args.clips / ray_s:.2f} clips/s "
            f"(start-up {summary.first_result_seconds:.1f} s, then {steady:.2f} clips/s)"
        )
        print(f"end-to-end ratio ray/loop (start-up included, {args.clips} clips): {loop_s / ray_s:.2f}")
        if args.clips < 64:
            # results arrive a shard at a time: a handful of clips gives no steady state to measure
            print(f"too few clips for a steady-state figure (--clips >= 64); ratio: {loop_s / ray_s:.2f}")
            return
        # start-up (actor imports and model loads) is paid once per job; a real job runs for hours
        print(f"throughput ratio ray/loop clips per second: {steady / loop_steady:.2f}")


if __name__ == "__main__":
    main()
