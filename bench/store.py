"""Planning and statistics at scale: the store's catalog vs re-reading every shard, on 400K rows.

    python bench/store.py [--rows 400000] [--shard-size 16]

Builds a latent store of ``--rows`` tiny rows (latents 4x3x2x2, 9 camera action rows each) in shards of
``--shard-size`` (the encode job's default: 400K clips are 25K shards), then times, in this process:

* before: what each encode run used to do on the driver — read the ``clip_id`` / ``encode_hash``
  columns of every shard to plan, then the whole action column (decoded row by row) for statistics;
* catalog, cold: the first run on a store without a catalog — every shard's ids and footer once;
* catalog, warm: every later run — list the shard folder, read the one catalog file, merge the footer
  statistics it caches.

Local disk here; on S3 the gap is wider: "before" costs ~2 GETs per shard per run (50K requests for
400K clips), a warm catalog ~1 LIST per 1,000 shards plus one GET. The last line is the ratio
before / warm (how many times faster a run's planning + statistics got).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from astra.data.actions import ActionStats
from astra.data.catalog import CATALOG, Catalog
from astra.data.store import LATENTS, LatentRecord, LatentStore

HASH = "bench"


def build(store: LatentStore, rows: int, shard_size: int) -> None:
    rng = np.random.default_rng(0)
    latents = torch.zeros(4, 3, 2, 2)

    def shard(start: int) -> None:
        store.write_latents(
            [
                LatentRecord(
                    clip_id=f"clip-{i:07d}",
                    dataset="bench",
                    modality="camera",
                    latents=latents,
                    actions=torch.from_numpy(rng.standard_normal((9, 12)).astype(np.float32)),
                    prompt_key="p",
                    source_uri=f"/data/clip-{i:07d}.mp4",
                    vae_id="random:bench",
                    encode_hash=HASH,
                    num_frames=33,
                    fps=16.0,
                    height=16,
                    width=16,
                )
                for i in range(start, min(start + shard_size, rows))
            ]
        )

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(shard, range(0, rows, shard_size)))


def before(store: LatentStore) -> tuple[int, int]:
    """The encode job's planning + statistics as they were: every shard, every run."""
    t = store.read_table(LATENTS, ["clip_id", "encode_hash"])
    done = {
        i
        for i, h in zip(t.column("clip_id").to_pylist(), t.column("encode_hash").to_pylist(), strict=True)
        if h == HASH
    }
    table = store.read_table(LATENTS, ["modality", "actions", "actions_shape", "encode_hash"])
    stats: dict[str, ActionStats] = {}
    for row in table.to_pylist():
        if row["encode_hash"] != HASH:
            continue
        rows = np.frombuffer(row["actions"], np.float32).reshape(row["actions_shape"])
        stats[row["modality"]] = stats.get(row["modality"], ActionStats.empty(rows.shape[1])).update(rows)
    return len(done), stats["camera"].count


def with_catalog(store: LatentStore) -> tuple[int, int]:
    cat = Catalog(store).refresh()
    complete, _ = cat.windows(HASH)
    return len(complete), cat.stats(HASH)["camera"].count


def timed(fn, store: LatentStore) -> tuple[float, tuple[int, int]]:
    start = time.perf_counter()
    out = fn(store)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--shard-size", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = LatentStore(str(Path(tmp) / "store"))
        start = time.perf_counter()
        build(store, args.rows, args.shard_size)
        shards = len(store.files(LATENTS))
        print(f"store: {args.rows} rows in {shards} shards, built in {time.perf_counter() - start:.1f} s")

        t_before, got_before = timed(before, store)
        print(
            f"before (every shard, every run): {t_before:.2f} s -> {got_before[0]} clips, {got_before[1]} action rows"
        )
        t_cold, got_cold = timed(with_catalog, store)
        size = (Path(store.root) / CATALOG).stat().st_size / 2**20
        print(
            f"catalog, cold (first run, builds it): {t_cold:.2f} s -> {got_cold[0]} clips (catalog {size:.1f} MiB)"
        )
        t_warm, got_warm = timed(with_catalog, store)
        print(
            f"catalog, warm (every later run): {t_warm:.2f} s -> {got_warm[0]} clips, {got_warm[1]} action rows"
        )
        assert got_before == got_cold == got_warm == (args.rows, 9 * args.rows)
        print(f"ratio before / warm catalog (planning + statistics per run): {t_before / t_warm:.1f}")


if __name__ == "__main__":
    main()
