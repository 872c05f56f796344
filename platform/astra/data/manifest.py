"""Manifests: the list of clips an encode job reads, one record per clip (JSONL or Parquet).

A record names the video (local path, relative to the manifest's folder, or ``s3://``), its
dataset, action modality, prompt and fps, and where its poses come from (``poses_uri`` in one of
the ``pose_format``s that ``astra.data.sources`` reads). Reading never raises on a bad record:
``read_manifest`` returns good records and ``(line, clip_id, reason)`` rejects, so one bad line is
quarantined instead of failing the whole job. Duplicate clip ids keep their first occurrence.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, ValidationError

from astra.config import FrozenModel

PoseFormat = Literal["astra", "spatialvid", "sekai"]


class ClipRecord(FrozenModel):
    clip_id: str = Field(min_length=1, description="Stable unique id; the encode job's idempotency key.")
    uri: str = Field(
        min_length=1, description="Video file: a path (relative to the manifest) or s3://bucket/key."
    )
    dataset: str = Field(
        "unknown", description="Source dataset name, e.g. 'spatialvid', 'sekai', 'synthetic'."
    )
    modality: str = Field(description="Action modality: a name registered in model.actions.modalities.")
    prompt: str = Field("", description="Text prompt / caption.")
    fps: float | None = Field(None, gt=0, description="Video frame rate; None reads it from the container.")
    poses_uri: str | None = Field(None, description="Where the per-frame poses are (file or folder).")
    pose_format: PoseFormat = Field("astra", description="How to read poses_uri (see astra.data.sources).")
    pose_fps: float | None = Field(
        None, gt=0, description="Rate of the pose samples when the format does not carry timestamps."
    )


@dataclass(frozen=True)
class Rejected:
    line: int  # 1-based line / row number in the manifest
    clip_id: str | None
    reason: str


def resolve_uri(uri: str, base: str | Path | None) -> str:
    """Relative local paths are relative to the manifest's folder; absolute paths and URLs stay."""
    if "://" in uri or base is None or Path(uri).is_absolute():
        return uri
    return str(Path(base) / uri)


def _rows(path: Path) -> Iterable[tuple[int, object]]:
    if path.suffix == ".parquet":
        for i, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield i, {k: v for k, v in row.items() if v is not None}
        return
    with path.open() as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as err:
                yield i, ValueError(f"manifest line {i}: not JSON ({err.msg})")


def read_manifest(path: str | Path) -> tuple[list[ClipRecord], list[Rejected]]:
    """Parse a JSONL / Parquet manifest into records (uris resolved) and rejects with reasons."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"manifest: file not found: {path}")
    base = path.parent
    good: list[ClipRecord] = []
    bad: list[Rejected] = []
    first_line: dict[str, int] = {}
    for line, row in _rows(path):
        clip_id = row.get("clip_id") if isinstance(row, dict) else None
        if isinstance(row, Exception):
            bad.append(Rejected(line, None, str(row)))
            continue
        if not isinstance(row, dict):
            bad.append(Rejected(line, None, f"manifest line {line}: expected a JSON object"))
            continue
        try:
            rec = ClipRecord.model_validate(row)
        except ValidationError as err:
            fields = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
            bad.append(
                Rejected(line, str(clip_id) if clip_id else None, f"invalid manifest record: {fields}")
            )
            continue
        if rec.clip_id in first_line:
            bad.append(
                Rejected(
                    line,
                    rec.clip_id,
                    f"duplicate clip_id (first seen on manifest line {first_line[rec.clip_id]})",
                )
            )
            continue
        first_line[rec.clip_id] = line
        update = {"uri": resolve_uri(rec.uri, base)}
        if rec.poses_uri:
            update["poses_uri"] = resolve_uri(rec.poses_uri, base)
        good.append(rec.model_copy(update=update))
    return good, bad


def write_manifest(records: Iterable[ClipRecord | dict], path: str | Path) -> Path:
    """Write records as JSONL (``.jsonl``) or Parquet (``.parquet``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [r.model_dump(exclude_none=True) if isinstance(r, ClipRecord) else dict(r) for r in records]
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
