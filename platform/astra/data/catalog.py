"""The store's catalog: what every latent shard holds, and its action statistics, in one small file.

Planning an encode run (which clips are done?) and the run's action statistics would otherwise open
every shard: 400K clips are ~25K shards, minutes of reads on S3 on every run. Shards are immutable and
named by their content, so what a shard holds never changes; the catalog (``index/latents.parquet``,
one row per shard) caches each shard's row ids — clip, source clip, window, last-window flag, encode
hash, modality, latent count — and the per-modality action statistics the writer put in the shard's
footer. ``refresh`` lists the shard folder (one LIST per 1,000 objects on S3), reads only the shards the
catalog does not know yet (id columns only, plus the footer; in parallel), forgets shards that are gone
and rewrites the catalog atomically when anything changed.

The catalog is a cache, never the truth: deleting it, or two jobs racing to rewrite it, loses nothing —
shards it does not list are simply read again. A store that cannot be written (read-only credentials)
still reads: the refreshed catalog then lives in memory only.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from astra.data.actions import ActionStats
from astra.data.storage import write_atomic
from astra.data.store import LATENTS, STATS_KEY, LatentStore, shard_stats

log = logging.getLogger(__name__)

CATALOG = "index/latents.parquet"
#: per-row columns the catalog keeps (as one list per shard)
ROW_FIELDS = [
    ("clip_id", pa.string()),
    ("source_clip_id", pa.string()),
    ("window", pa.int32()),
    ("last_window", pa.bool_()),
    ("encode_hash", pa.string()),
    ("modality", pa.string()),
    ("num_latents", pa.int32()),
]
CATALOG_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),  # file name inside latents/
        ("size", pa.int64()),  # bytes: a shard rewritten in place (never by us) is read again
        *[(name, pa.list_(t)) for name, t in ROW_FIELDS],
        ("stats", pa.string()),  # JSON {encode_hash: {modality: ActionStats.to_dict()}}
    ]
)
_SCAN_THREADS = 16  # shard reads are I/O bound (S3 latency): overlap them


def _scan_shard(fs: pafs.FileSystem, path: str, size: int) -> dict:
    """One shard -> its catalog row: id columns and footer only (its old shards: stats from actions)."""
    with fs.open_input_file(path) as fh:
        pf = pq.ParquetFile(fh)
        names = set(pf.schema_arrow.names)
        meta = pf.schema_arrow.metadata or {}
        wanted = ["clip_id", "encode_hash", "modality", "latents_shape"]
        wanted += [c for c in ("source_clip_id", "window", "last_window") if c in names]
        if STATS_KEY not in meta:  # written before shards carried their statistics
            wanted += ["actions", "actions_shape"]
        t = pf.read(columns=wanted)
    ids = t.column("clip_id").to_pylist()
    n = len(ids)
    row = {
        "shard": path.rsplit("/", 1)[-1],
        "size": size,
        "clip_id": ids,
        "source_clip_id": t.column("source_clip_id").to_pylist() if "source_clip_id" in names else ids,
        "window": t.column("window").to_pylist() if "window" in names else [0] * n,
        "last_window": t.column("last_window").to_pylist() if "last_window" in names else [True] * n,
        "encode_hash": t.column("encode_hash").to_pylist(),
        "modality": t.column("modality").to_pylist(),
        "num_latents": [s[1] for s in t.column("latents_shape").to_pylist()],
    }
    if STATS_KEY in meta:
        row["stats"] = meta[STATS_KEY].decode()
    else:
        row["stats"] = json.dumps(
            shard_stats(t.select(["encode_hash", "modality", "actions", "actions_shape"]).to_pylist())
        )
    return row


class Catalog:
    """The latent shards of a store and what they hold. Build with ``Catalog(store).refresh()``."""

    def __init__(self, store: LatentStore):
        self.store = store
        self.table = CATALOG_SCHEMA.empty_table()
        self.scanned = 0  # shards read by the last refresh (0 when the catalog knew them all)
        self._where: dict[str, list[tuple[str, str]]] | None = None  # row id -> [(hash, shard)], lazily

    @property
    def path(self) -> str:
        return f"{self.store.root}/{CATALOG}"

    def _load(self) -> pa.Table:
        fs = self.store.fs
        if fs.get_file_info(self.path).type == pafs.FileType.NotFound:
            return CATALOG_SCHEMA.empty_table()
        try:
            return pq.read_table(self.path, filesystem=fs, schema=CATALOG_SCHEMA)
        except (OSError, pa.ArrowInvalid) as err:  # unreadable cache: rebuild it
            log.warning("catalog %s unreadable (%s): rebuilding it from the shards", self.path, err)
            return CATALOG_SCHEMA.empty_table()

    def refresh(self) -> Catalog:
        fs = self.store.fs
        listed = {info.base_name: info for info in self.store.file_infos(LATENTS)}
        cached = self._load()
        known = cached.column("shard").to_pylist()
        sizes = cached.column("size").to_pylist()
        keep = [i for i, name in enumerate(known) if name in listed and listed[name].size == sizes[i]]
        new = sorted(set(listed) - {known[i] for i in keep})
        with ThreadPoolExecutor(min(_SCAN_THREADS, max(1, len(new)))) as pool:
            scanned = list(pool.map(lambda name: _scan_shard(fs, listed[name].path, listed[name].size), new))
        table = cached.take(pa.array(keep, type=pa.int64()))
        if scanned:
            table = pa.concat_tables([table, pa.Table.from_pylist(scanned, schema=CATALOG_SCHEMA)])
        self.table, self.scanned, self._where = table, len(new), None
        if new or len(keep) != len(known):
            buf = pa.BufferOutputStream()
            pq.write_table(table, buf, compression="zstd")
            try:
                write_atomic(fs, self.path, buf.getvalue().to_pybytes())
            except OSError as err:  # a read-only store still reads
                log.info("catalog %s not saved (%s): kept in memory", self.path, err)
        return self

    # ------------------------------------------------------------------ queries

    def rows(self, encode_hash: str | None = None) -> pa.Table:
        """One row per stored latent row: ``shard`` plus ROW_FIELDS (optionally one encode hash)."""
        parents = pc.list_parent_indices(self.table.column("clip_id"))
        cols = {"shard": pc.take(self.table.column("shard"), parents)}
        for name, _ in ROW_FIELDS:
            cols[name] = pc.list_flatten(self.table.column(name))
        rows = pa.table(cols)
        if encode_hash is not None:
            rows = rows.filter(pc.equal(rows.column("encode_hash"), encode_hash))
        return rows

    def shard_of(self, clip_id: str, encode_hash: str | None = None) -> str | None:
        """Path of the shard holding row ``clip_id`` of ``encode_hash`` (None: the newest-listed of any
        generation); None when no shard does."""
        if self._where is None:
            rows = self.rows()
            self._where = {}
            for cid, h, shard in zip(
                *(rows.column(c).to_pylist() for c in ("clip_id", "encode_hash", "shard")), strict=True
            ):
                self._where.setdefault(cid, []).append((h, shard))
        hits = [shard for h, shard in self._where.get(clip_id, []) if encode_hash in (None, h)]
        return f"{self.store.root}/{LATENTS}/{hits[-1]}" if hits else None

    def windows(self, encode_hash: str | None) -> tuple[set[str], dict[str, set[int]]]:
        """(source clips stored completely, {source clip: windows stored} for the incomplete ones).

        Complete = the last window is stored and every window before it."""
        rows = self.rows(encode_hash)
        src = np.asarray(rows.column("source_clip_id").to_pylist(), dtype=object)
        window = rows.column("window").to_numpy()
        last = rows.column("last_window").to_numpy(zero_copy_only=False)
        whole = (window == 0) & last  # the common case, settled without a Python loop
        complete = set(src[whole])
        stored: dict[str, set[int]] = {}
        final: dict[str, int] = {}
        for s, w, is_last in zip(src[~whole], window[~whole], last[~whole], strict=True):
            stored.setdefault(s, set()).add(int(w))
            if is_last:
                final[s] = int(w)
        partial = {}
        for s, got in stored.items():
            if s in final and got >= set(range(final[s] + 1)):
                complete.add(s)
            else:
                partial[s] = got
        return complete, partial

    def complete_clips(self, encode_hash: str | None = None) -> set[str]:
        return self.windows(encode_hash)[0]

    def stats(self, encode_hash: str) -> dict[str, ActionStats]:
        """Per-modality action statistics of every row of ``encode_hash``, merged from shard footers."""
        out: dict[str, ActionStats] = {}
        for doc in self.table.column("stats").to_pylist():
            for modality, d in json.loads(doc or "{}").get(encode_hash, {}).items():
                s = ActionStats.from_dict(d)
                out[modality] = out[modality].merge(s) if modality in out else s
        return out
