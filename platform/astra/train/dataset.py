"""Reading the latent store for training: streaming through Ray Data, records decoded on the way.

Random access by clip id is ``LatentStore.get``; this module is the streaming side: every
committed latent shard (local or S3) read by Ray Data, optionally only one encode generation, each
row decoded into a ``LatentRecord`` (tensors rebuilt from bytes + dtype + shape).
"""

from __future__ import annotations

import ray

from astra.data.store import LATENTS, LATENTS_SCHEMA, LatentRecord, LatentStore


def stream_latents(
    store: LatentStore, encode_hash: str | None = None, decode: bool = True
) -> ray.data.Dataset:
    """A Ray Dataset over the store's latent rows (``LatentRecord`` items when ``decode``)."""
    files = store.files(LATENTS)
    if not files:
        raise ValueError(f"{store}: the latent store is empty; run jobs/encode.py first")
    ds = ray.data.read_parquet(files, filesystem=store.fs, schema=LATENTS_SCHEMA)
    if encode_hash is not None:
        ds = ds.filter(lambda row: row["encode_hash"] == encode_hash)
    if decode:
        ds = ds.map(lambda row: {"record": LatentRecord.from_row(row)})
    return ds


def records(ds: ray.data.Dataset):
    """Iterate the decoded records of ``stream_latents`` (a convenience for loops and tests)."""
    for row in ds.iter_rows():
        yield row["record"]
