"""The store's catalog: planning and statistics at scale without re-reading the shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from astra.data.actions import ActionStats
from astra.data.catalog import CATALOG, Catalog
from astra.data.store import LATENTS, LatentRecord, LatentStore

BOTH = pytest.mark.parametrize("store_config", ["local", "s3"], indirect=True)


def _rec(
    cid: str, window: int = 0, last: bool = True, h: str = "h1", modality: str = "camera", rows: int = 5
):
    g = torch.Generator().manual_seed(sum(map(ord, cid)) + window)
    return LatentRecord(
        clip_id=cid if window == 0 else f"{cid}#{window}",
        source_clip_id=cid,
        window=window,
        last_window=last,
        dataset="synthetic",
        modality=modality,
        latents=torch.randn(4, 5, 2, 2, generator=g),
        actions=torch.randn(rows, 12, generator=g),
        prompt_key="k",
        source_uri=f"/data/{cid}.mp4",
        vae_id="random:test",
        encode_hash=h,
        num_frames=17,
        fps=16.0,
        height=16,
        width=16,
    )


def _fill(store: LatentStore) -> list[LatentRecord]:
    shards = [
        [_rec("a"), _rec("b")],
        [_rec("long", 0, last=False), _rec("c", rows=0)],  # c: action-free
        [_rec("long", 1, last=True)],
        [_rec("half", 0, last=False)],  # its window 1 never arrived
        [_rec("other", h="h2", modality="robot")],
    ]
    for shard in shards:
        store.write_latents(shard)
    return [r for shard in shards for r in shard]


@BOTH
def test_catalog_knows_complete_and_partial_clips_and_merges_footer_stats(store_config):
    store = LatentStore(store_config)
    recs = _fill(store)
    cat = Catalog(store).refresh()
    assert cat.scanned == 5 and Catalog(store).refresh().scanned == 0  # each shard read once, ever
    complete, partial = cat.windows("h1")
    assert complete == {"a", "b", "c", "long"} and partial == {"half": {0}}
    want = ActionStats.empty(12)
    for r in recs:
        if r.encode_hash == "h1":
            want = want.update(r.actions.numpy())
    got = cat.stats("h1")["camera"]
    assert (
        got.count == want.count == 25
        and np.allclose(got.total, want.total)
        and np.allclose(got.total_sq, want.total_sq)
    )
    assert set(cat.stats("h2")) == {"robot"}
    assert store.clip_ids("h1") == {"a", "b", "c", "long", "long#1", "half"}


def test_plan_and_stats_never_read_the_shards_data(tmp_path):
    store = LatentStore(str(tmp_path / "store"))
    _fill(store)
    before = Catalog(store).refresh()
    # scramble every shard's column data (keeping its name and size): only the catalog can answer now
    for path in store.files(LATENTS):
        data = bytearray(Path(path).read_bytes())
        data[8 : len(data) // 2] = bytes(len(data) // 2 - 8)
        Path(path).write_bytes(bytes(data))
    with pytest.raises(Exception):  # noqa: B017 - the shards really are unreadable now
        store.read_table(LATENTS, ["clip_id"])
    after = Catalog(store).refresh()
    assert after.scanned == 0 and after.windows("h1") == before.windows("h1")
    assert after.stats("h1")["camera"].count == before.stats("h1")["camera"].count
    assert store.quarantined("h1") == {}


def test_catalog_follows_new_and_removed_shards_and_rebuilds(tmp_path):
    store = LatentStore(str(tmp_path / "store"))
    _fill(store)
    Catalog(store).refresh()
    store.write_latents([_rec("half", 1, last=True)])  # the missing window arrives
    cat = Catalog(store).refresh()
    assert cat.scanned == 1 and "half" in cat.complete_clips("h1")
    gone = store.catalog().shard_of("a")
    Path(gone).unlink()  # a shard removed by hand
    cat = Catalog(store).refresh()
    assert "a" not in cat.complete_clips("h1") and cat.shard_of("a") is None and cat.scanned == 0
    (Path(store.root) / CATALOG).write_bytes(b"not parquet")  # a broken cache is rebuilt
    cat = Catalog(store).refresh()
    assert cat.scanned == len(store.files(LATENTS)) and "half" in cat.complete_clips("h1")


def test_shards_of_the_first_store_format_are_read_too(tmp_path):
    """Shards written before windows and footer statistics existed: whole clips, stats from actions."""
    store = LatentStore(str(tmp_path / "store"))
    row = _rec("old").to_row()
    old = {
        k: v for k, v in row.items() if k not in ("source_clip_id", "window", "last_window", "start_seconds")
    }
    (Path(store.root) / LATENTS).mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([old]), Path(store.root) / LATENTS / "part-old.parquet")
    cat = Catalog(store).refresh()
    assert cat.complete_clips("h1") == {"old"} and cat.stats("h1")["camera"].count == 5
    assert store.get("old").last_window and store.get("old").source_clip_id == "old"
