"""The latent store: Parquet shards of encoded clips on a local folder or S3.

Layout under the store root::

    latents/part-<key>.parquet     one row per encoded clip (schema LATENTS_SCHEMA)
    prompts/part-<key>.parquet     prompt embeddings, one row per (prompt, text encoder), deduplicated
    quarantine/part-<key>.parquet  rejected clips and why (schema QUARANTINE_SCHEMA)
    stats/<encode_hash>.json       per-modality action statistics of the encoded clips

``latents`` columns: ``clip_id``, ``dataset``, ``modality``, ``latents`` (raw bytes) with
``latents_shape`` (C, F, h, w) and ``latents_dtype`` (Arrow has no bfloat16, so tensors are stored as
bytes + dtype + shape), ``actions`` (float32 bytes) with ``actions_shape`` (F, raw_dim) — one row per
latent frame, ``prompt_key`` (into ``prompts``), ``source_uri``, ``vae_id``, ``encode_hash`` (of the
encode settings that shape the latents), ``num_frames``, ``fps``, ``height``, ``width``.

Shards are immutable and written atomically (see ``storage.write_atomic``), named by a hash of their
content's clip ids, so a retried writer overwrites its own shard instead of duplicating rows. The
store never rewrites a shard; readers ignore anything that is not ``part-*.parquet``.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from astra.data.storage import StorageConfig, write_atomic

LATENTS, PROMPTS, QUARANTINE, STATS = "latents", "prompts", "quarantine", "stats"

LATENTS_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
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

    @classmethod
    def from_row(cls, row: dict) -> LatentRecord:
        return cls(
            clip_id=row["clip_id"],
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


# ----------------------------------------------------------------------------- the store


class LatentStore:
    def __init__(self, config: StorageConfig | str):
        self.config = StorageConfig(uri=config) if isinstance(config, str) else config
        self.fs, self.root = self.config.filesystem()
        self._index: dict[str, str] | None = None

    def __repr__(self) -> str:
        return f"LatentStore({self.config.uri!r})"

    # ------------------------------------------------------------------ files

    def files(self, table: str) -> list[str]:
        """Committed shard paths of a table, sorted (paths inside ``self.fs``)."""
        selector = pafs.FileSelector(f"{self.root}/{table}", allow_not_found=True)
        names = [
            f.path
            for f in self.fs.get_file_info(selector)
            if f.base_name.startswith("part-") and f.base_name.endswith(".parquet")
        ]
        return sorted(names)

    def write_rows(self, table: str, rows: list[dict], key_column: str, salt: str = "") -> str | None:
        """Write rows as one immutable shard; returns its path (None for no rows)."""
        if not rows:
            return None
        arrow = pa.Table.from_pylist(rows, schema=SCHEMAS[table])
        buf = io.BytesIO()
        pq.write_table(arrow, buf, compression="zstd")
        path = f"{self.root}/{table}/{shard_name([str(r[key_column]) for r in rows], salt)}"
        write_atomic(self.fs, path, buf.getvalue())
        self._index = None
        return path

    def read_table(self, table: str, columns: list[str] | None = None, filter=None) -> pa.Table:
        files = self.files(table)
        if not files:
            return SCHEMAS[table].empty_table().select(columns) if columns else SCHEMAS[table].empty_table()
        dataset = pq.ParquetDataset(files, filesystem=self.fs, schema=SCHEMAS[table], filters=filter)
        return dataset.read(columns=columns)

    # ------------------------------------------------------------------ latents

    def write_latents(self, records: list[LatentRecord]) -> str | None:
        return self.write_rows(LATENTS, [r.to_row() for r in records], "clip_id", salt="latents")

    def clip_ids(self, encode_hash: str | None = None) -> set[str]:
        t = self.read_table(LATENTS, ["clip_id", "encode_hash"])
        ids, hashes = t.column("clip_id").to_pylist(), t.column("encode_hash").to_pylist()
        return {i for i, h in zip(ids, hashes, strict=True) if encode_hash is None or h == encode_hash}

    def count_rows(self, table: str = LATENTS) -> dict[str, int]:
        """Rows per clip id (the exactly-once check)."""
        col = "prompt_key" if table == PROMPTS else "clip_id"
        counts: dict[str, int] = {}
        for cid in self.read_table(table, [col]).column(col).to_pylist():
            counts[cid] = counts.get(cid, 0) + 1
        return counts

    def _build_index(self) -> dict[str, str]:
        index: dict[str, str] = {}
        for path in self.files(LATENTS):
            for cid in (
                pq.read_table(path, columns=["clip_id"], filesystem=self.fs).column("clip_id").to_pylist()
            ):
                index.setdefault(cid, path)
        return index

    def get(self, clip_id: str) -> LatentRecord | None:
        """Random access by clip id (an id -> shard index is built on first use)."""
        if self._index is None:
            self._index = self._build_index()
        path = self._index.get(clip_id)
        if path is None:
            return None
        rows = pq.read_table(path, filesystem=self.fs, filters=[("clip_id", "=", clip_id)]).to_pylist()
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
        """rows: dicts with clip_id, source_uri, stage, reason, encode_hash."""
        return self.write_rows(QUARANTINE, rows, "clip_id", salt="quarantine")

    def quarantined(self, encode_hash: str | None = None) -> dict[str, str]:
        """clip_id -> reason."""
        t = self.read_table(QUARANTINE).to_pylist()
        return {
            r["clip_id"]: r["reason"] for r in t if encode_hash is None or r["encode_hash"] == encode_hash
        }

    # ------------------------------------------------------------------ small JSON documents

    def write_json(self, name: str, obj: dict) -> None:
        write_atomic(self.fs, f"{self.root}/{name}", json.dumps(obj, indent=2, sort_keys=True).encode())

    def read_json(self, name: str) -> dict | None:
        path = f"{self.root}/{name}"
        if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        with self.fs.open_input_stream(path) as fh:
            return json.loads(fh.read())
