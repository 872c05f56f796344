"""The latent store: Parquet shards of encoded clips on a local folder or S3.

Layout under the store root::

    latents/part-<key>.parquet     one row per encoded clip (schema LATENTS_SCHEMA)
    prompts/part-<key>.parquet     prompt embeddings, one row per (prompt, text encoder), deduplicated
    quarantine/part-<key>.parquet  rejected clips and why (schema QUARANTINE_SCHEMA)
    stats/<encode_hash>.json       per-modality action statistics of the encoded clips

    index/latents.parquet          the catalog: what each latent shard holds (astra.data.catalog)

``latents`` columns: ``clip_id`` (the row's unique key), ``source_clip_id`` (the manifest's clip id),
``window`` / ``last_window`` / ``start_seconds`` (a long clip is stored as consecutive windows: window k
of clip c has id ``c`` for k = 0 and ``c#k`` after; the last one is flagged so a resumed run knows the
clip is complete), ``dataset``, ``modality``, ``latents`` (raw bytes) with ``latents_shape`` (C, F, h, w)
and ``latents_dtype`` (Arrow has no bfloat16, so tensors are stored as bytes + dtype + shape),
``actions`` (float32 bytes) with ``actions_shape`` (F, raw_dim) — one row per latent frame, or (0,
raw_dim) for an *action-free* clip (plain video: training treats it as null actions), ``prompt_key``
(into ``prompts``), ``source_uri``, ``vae_id``, ``encode_hash`` (of the encode settings that shape the
latents), ``num_frames``, ``fps``, ``height``, ``width``. Each latent shard's footer carries its
per-modality action statistics (``astra.stats``), so statistics never re-read the action column.

Shards are immutable and written atomically (see ``storage.write_atomic``), named by a hash of their
content's ids (latent shards: and encode hashes), so a retried writer overwrites its own shard instead
of duplicating rows. The store never rewrites a shard; readers ignore anything not ``part-*.parquet``. Quarantine rows
carry their time: a clip's status is its latest row, and a clip stored later is no longer quarantined.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from astra.data.actions import ActionStats
from astra.data.storage import StorageConfig, write_atomic

LATENTS, PROMPTS, QUARANTINE, STATS = "latents", "prompts", "quarantine", "stats"
STATS_KEY = b"astra.stats"  # footer metadata of a latent shard: {encode_hash: {modality: ActionStats}}

LATENTS_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("source_clip_id", pa.string()),
        ("window", pa.int32()),
        ("last_window", pa.bool_()),
        ("start_seconds", pa.float32()),
        ("dataset", pa.string()),
        ("modality", pa.string()),
        ("latents", pa.binary()),
        ("latents_shape", pa.list_(pa.int32())),
        ("latents_dtype", pa.string()),
        ("actions", pa.binary()),
        ("actions_shape", pa.list_(pa.int32())),
        ("prompt_key", pa.string()),
        ("source_uri", pa.string()),
        ("vae_id", pa.string()),
        ("encode_hash", pa.string()),
        ("num_frames", pa.int32()),
        ("fps", pa.float32()),
        ("height", pa.int32()),
        ("width", pa.int32()),
    ]
)
PROMPTS_SCHEMA = pa.schema(
    [
        ("prompt_key", pa.string()),
        ("prompt", pa.string()),
        ("encoder_id", pa.string()),
        ("embedding", pa.binary()),
        ("embedding_shape", pa.list_(pa.int32())),
        ("embedding_dtype", pa.string()),
    ]
)
QUARANTINE_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("source_uri", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("encode_hash", pa.string()),
        ("quarantined_at", pa.timestamp("ms", tz="UTC")),
    ]
)
SCHEMAS = {LATENTS: LATENTS_SCHEMA, PROMPTS: PROMPTS_SCHEMA, QUARANTINE: QUARANTINE_SCHEMA}


# ----------------------------------------------------------------------------- tensor codec


def tensor_to_bytes(t: torch.Tensor) -> tuple[bytes, list[int], str]:
    """Any dtype (bf16 included) -> (raw little-endian bytes, shape, dtype name)."""
    t = t.detach().cpu().contiguous()
    dtype = str(t.dtype).removeprefix("torch.")
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    return raw.numpy().tobytes(), list(t.shape), dtype


def tensor_from_bytes(data: bytes, shape: list[int], dtype: str) -> torch.Tensor:
    if dtype == "bfloat16":
        return (
            torch.from_numpy(np.frombuffer(data, dtype=np.int16).copy()).view(torch.bfloat16).reshape(shape)
        )
    return torch.from_numpy(np.frombuffer(data, dtype=np.dtype(dtype)).copy()).reshape(shape)


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class LatentRecord:
    clip_id: str
    dataset: str
    modality: str
    latents: torch.Tensor  # (C, F, h, w)
    actions: torch.Tensor  # (F, raw_dim) float32
    prompt_key: str
    source_uri: str
    vae_id: str
    encode_hash: str
    num_frames: int
    fps: float
    height: int
    width: int
    source_clip_id: str = ""  # the manifest's clip id ("" = clip_id)
    window: int = 0  # index of this window within the source clip
    last_window: bool = True  # no later window of the source clip exists
    start_seconds: float = 0.0  # where the window starts in the source video

    @property
    def has_actions(self) -> bool:
        """False for an action-free clip (plain video: no poses, zero action rows)."""
        return self.actions.shape[0] > 0

    @classmethod
    def from_row(cls, row: dict) -> LatentRecord:
        return cls(
            clip_id=row["clip_id"],
            source_clip_id=row.get("source_clip_id") or row["clip_id"],
            window=row.get("window") or 0,
            last_window=row.get("last_window") is not False,
            start_seconds=row.get("start_seconds") or 0.0,
            dataset=row["dataset"],
            modality=row["modality"],
            latents=tensor_from_bytes(row["latents"], row["latents_shape"], row["latents_dtype"]),
            actions=tensor_from_bytes(row["actions"], row["actions_shape"], "float32"),
            prompt_key=row["prompt_key"],
            source_uri=row["source_uri"],
            vae_id=row["vae_id"],
            encode_hash=row["encode_hash"],
            num_frames=row["num_frames"],
            fps=row["fps"],
            height=row["height"],
            width=row["width"],
        )

    def to_row(self) -> dict:
        lat, lat_shape, lat_dtype = tensor_to_bytes(self.latents)
        act, act_shape, _ = tensor_to_bytes(self.actions.float())
        return {
            "clip_id": self.clip_id,
            "source_clip_id": self.source_clip_id or self.clip_id,
            "window": self.window,
            "last_window": self.last_window,
            "start_seconds": self.start_seconds,
            "dataset": self.dataset,
            "modality": self.modality,
            "latents": lat,
            "latents_shape": lat_shape,
            "latents_dtype": lat_dtype,
            "actions": act,
            "actions_shape": act_shape,
            "prompt_key": self.prompt_key,
            "source_uri": self.source_uri,
            "vae_id": self.vae_id,
            "encode_hash": self.encode_hash,
            "num_frames": self.num_frames,
            "fps": self.fps,
            "height": self.height,
            "width": self.width,
        }


def shard_name(keys: list[str], salt: str = "") -> str:
    """Deterministic shard file name from the ids it holds: a retried write lands on the same file."""
    digest = hashlib.sha256((salt + "\x00" + "\x00".join(sorted(keys))).encode()).hexdigest()[:24]
    return f"part-{digest}.parquet"


def shard_stats(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """Per-(encode hash, modality) action statistics of latent rows, as stored in a shard's footer."""
    stats: dict[str, dict[str, ActionStats]] = {}
    for row in rows:
        count, dim = row["actions_shape"]
        if not count:  # action-free clip
            continue
        actions = np.frombuffer(row["actions"], np.float32).reshape(count, dim)
        per_hash = stats.setdefault(row["encode_hash"], {})
        per_hash[row["modality"]] = per_hash.get(row["modality"], ActionStats.empty(dim)).update(actions)
    return {h: {m: s.to_dict() for m, s in per.items()} for h, per in stats.items()}


def _later(a, b) -> bool:
    """Quarantine times: is ``a`` at or after ``b``? (Rows of older stores have no time: oldest.)"""
    return a is not None and (b is None or a >= b)


# ----------------------------------------------------------------------------- the store


class LatentStore:
    def __init__(self, config: StorageConfig | str):
        self.config = StorageConfig(uri=config) if isinstance(config, str) else config
        self.fs, self.root = self.config.filesystem()
        self._catalog = None  # cached for random access; planning always refreshes

    def __repr__(self) -> str:
        return f"LatentStore({self.config.uri!r})"

    def catalog(self):
        """The catalog of latent shards, refreshed (see astra.data.catalog)."""
        from astra.data.catalog import Catalog

        self._catalog = Catalog(self).refresh()
        return self._catalog

    # ------------------------------------------------------------------ files

    def file_infos(self, table: str) -> list[pafs.FileInfo]:
        """Committed shards of a table (path, size, ...), sorted by path."""
        selector = pafs.FileSelector(f"{self.root}/{table}", allow_not_found=True)
        infos = [
            f
            for f in self.fs.get_file_info(selector)
            if f.base_name.startswith("part-") and f.base_name.endswith(".parquet")
        ]
        return sorted(infos, key=lambda f: f.path)

    def files(self, table: str) -> list[str]:
        """Committed shard paths of a table, sorted (paths inside ``self.fs``)."""
        return [f.path for f in self.file_infos(table)]

    def write_rows(
        self, table: str, rows: list[dict], key_column: str, salt: str = "", metadata: dict | None = None
    ) -> str | None:
        """Write rows as one immutable shard (``metadata``: JSON documents for its footer); returns its
        path (None for no rows)."""
        if not rows:
            return None
        arrow = pa.Table.from_pylist(rows, schema=SCHEMAS[table])
        if metadata:
            arrow = arrow.replace_schema_metadata(
                {**(arrow.schema.metadata or {}), **{k: json.dumps(v) for k, v in metadata.items()}}
            )
        buf = io.BytesIO()
        pq.write_table(arrow, buf, compression="zstd")
        path = f"{self.root}/{table}/{shard_name([str(r[key_column]) for r in rows], salt)}"
        write_atomic(self.fs, path, buf.getvalue())
        return path

    def read_table(self, table: str, columns: list[str] | None = None, filter=None) -> pa.Table:
        files = self.files(table)
        if not files:
            return SCHEMAS[table].empty_table().select(columns) if columns else SCHEMAS[table].empty_table()
        dataset = pq.ParquetDataset(files, filesystem=self.fs, schema=SCHEMAS[table], filters=filter)
        return dataset.read(columns=columns)

    # ------------------------------------------------------------------ latents

    def write_latents(self, records: list[LatentRecord]) -> str | None:
        return self.write_latent_rows([r.to_row() for r in records])

    def write_latent_rows(self, rows: list[dict]) -> str | None:
        """Rows in LATENTS_SCHEMA's layout (``LatentRecord.to_row``) as one shard, with its statistics.
        The shard's name hashes its row ids *and* encode hashes: another encode generation of the same
        clips is another shard, never an overwrite (shards stay immutable)."""
        hashes = ",".join(sorted({str(r["encode_hash"]) for r in rows}))
        return self.write_rows(
            LATENTS, rows, "clip_id", salt=f"latents:{hashes}", metadata={STATS_KEY: shard_stats(rows)}
        )

    def clip_ids(self, encode_hash: str | None = None) -> set[str]:
        """Ids of the stored latent rows (windows included), from the catalog."""
        return set(self.catalog().rows(encode_hash).column("clip_id").to_pylist())

    def count_rows(self, table: str = LATENTS) -> dict[str, int]:
        """Rows per clip id (the exactly-once check), read from the shards themselves."""
        col = "prompt_key" if table == PROMPTS else "clip_id"
        counts: dict[str, int] = {}
        for cid in self.read_table(table, [col]).column(col).to_pylist():
            counts[cid] = counts.get(cid, 0) + 1
        return counts

    def get(self, clip_id: str, encode_hash: str | None = None) -> LatentRecord | None:
        """Random access by row id (the catalog says which shard holds it). A store holding several
        encode generations of a clip needs ``encode_hash`` to choose one."""
        path = self._catalog.shard_of(clip_id, encode_hash) if self._catalog is not None else None
        if path is None:  # unknown to the cached catalog: another writer may have added it since
            path = self.catalog().shard_of(clip_id, encode_hash)
        if path is None:
            return None
        flt = [("clip_id", "=", clip_id)] + ([("encode_hash", "=", encode_hash)] if encode_hash else [])
        rows = pq.read_table(path, filesystem=self.fs, filters=flt).to_pylist()
        return LatentRecord.from_row(rows[0])

    # ------------------------------------------------------------------ prompts

    def prompt_keys(self) -> set[str]:
        return set(self.read_table(PROMPTS, ["prompt_key"]).column("prompt_key").to_pylist())

    def write_prompts(self, items: list[tuple[str, str, str, torch.Tensor]]) -> str | None:
        """items: (prompt_key, prompt, encoder_id, embedding (L, D))."""
        rows = []
        for key, prompt, encoder_id, emb in items:
            data, shape, dtype = tensor_to_bytes(emb)
            rows.append(
                {
                    "prompt_key": key,
                    "prompt": prompt,
                    "encoder_id": encoder_id,
                    "embedding": data,
                    "embedding_shape": shape,
                    "embedding_dtype": dtype,
                }
            )
        return self.write_rows(PROMPTS, rows, "prompt_key", salt="prompts")

    def prompt_embeddings(self, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
        flt = None if keys is None else [("prompt_key", "in", list(keys))]
        out = {}
        for row in self.read_table(PROMPTS, filter=flt).to_pylist():
            out[row["prompt_key"]] = tensor_from_bytes(
                row["embedding"], row["embedding_shape"], row["embedding_dtype"]
            )
        return out

    # ------------------------------------------------------------------ quarantine

    def quarantine(self, rows: list[dict]) -> str | None:
        """rows: dicts with clip_id (the manifest's), source_uri, stage, reason, encode_hash; stamped now."""
        now = time.time_ns() // 1_000_000
        rows = [{**r, "quarantined_at": r.get("quarantined_at") or now} for r in rows]
        # the time is part of the shard's name: a clip quarantined again later gets a new row
        return self.write_rows(QUARANTINE, rows, "clip_id", salt=f"quarantine-{now}")

    def quarantine_table(
        self, encode_hash: str | None = None, complete: set[str] | None = None
    ) -> list[dict]:
        """Each clip's *latest* quarantine row, minus clips stored completely since (a retry that
        succeeded); ``complete``: those clips, when the caller already has them from the catalog."""
        latest: dict[str, dict] = {}
        for row in self.read_table(QUARANTINE).to_pylist():
            if encode_hash is not None and row["encode_hash"] != encode_hash:
                continue
            have = latest.get(row["clip_id"])
            if have is None or _later(row["quarantined_at"], have["quarantined_at"]):
                latest[row["clip_id"]] = row
        if latest:
            if complete is None:
                complete = self.catalog().complete_clips(encode_hash)
            latest = {cid: r for cid, r in latest.items() if cid not in complete}
        return sorted(latest.values(), key=lambda r: r["clip_id"])

    def quarantined(self, encode_hash: str | None = None) -> dict[str, str]:
        """clip_id -> reason of each clip whose latest status is quarantined."""
        return {r["clip_id"]: r["reason"] for r in self.quarantine_table(encode_hash)}

    # ------------------------------------------------------------------ small JSON documents

    def write_json(self, name: str, obj: dict) -> None:
        write_atomic(self.fs, f"{self.root}/{name}", json.dumps(obj, indent=2, sort_keys=True).encode())

    def read_json(self, name: str) -> dict | None:
        path = f"{self.root}/{name}"
        if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        with self.fs.open_input_stream(path) as fh:
            return json.loads(fh.read())
