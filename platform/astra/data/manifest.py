"""Manifests: the list of clips an encode job reads, one record per clip (JSONL or Parquet).

A record names the video (local path, relative to the manifest's folder, or ``s3://``), its
dataset, action modality, prompt and fps, and where its poses come from (``poses_uri`` in one of
the ``pose_format``s that ``astra.data.sources`` reads; without one the clip is *action-free*).
Reading never raises on a bad record: ``read_manifest`` returns good records and ``(line, clip_id,
reason)`` rejects, so one bad line is quarantined instead of failing the whole job. Duplicate clip
ids keep their first occurrence. Uris come back resolved — absolute paths or ``s3://`` — so what the
store records does not depend on the directory a job ran in.

Build a manifest from a folder or a dataset layout with the command line::

    python -m astra.data.manifest folder VIDEOS_DIR_OR_S3_PREFIX --out manifest.jsonl [--modality camera]
    python -m astra.data.manifest spatialvid ROOT --out manifest.jsonl
    python -m astra.data.manifest sekai ROOT ANNOTATIONS.csv --out manifest.jsonl
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, ValidationError

from astra.config import FrozenModel
from astra.data.storage import StorageConfig, write_atomic

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
    poses_uri: str | None = Field(
        None, description="Where the per-frame poses are (file or folder); None: an action-free clip."
    )
    pose_format: PoseFormat = Field("astra", description="How to read poses_uri (see astra.data.sources).")
    pose_fps: float | None = Field(
        None, gt=0, description="Rate of the pose samples when the format does not carry timestamps."
    )


@dataclass(frozen=True)
class Rejected:
    line: int  # 1-based line / row number in the manifest
    clip_id: str | None
    reason: str
    duplicate: bool = False  # the clip id is an earlier record's


def resolve_uri(uri: str, base: str | None) -> str:
    """Relative paths are relative to the manifest's folder (local or ``s3://``); the result is
    absolute or a URL."""
    if "://" in uri or Path(uri).is_absolute():
        return uri
    if base is not None and "://" in base:
        return f"{base.rstrip('/')}/{uri}"
    return os.path.abspath(os.path.join(base or ".", uri))


def _rows(data: bytes, parquet: bool) -> Iterable[tuple[int, object]]:
    if parquet:
        for i, row in enumerate(pq.read_table(io.BytesIO(data)).to_pylist(), 1):
            yield i, {k: v for k, v in row.items() if v is not None}
        return
    for i, line in enumerate(data.decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as err:
            yield i, ValueError(f"manifest line {i}: not JSON ({err.msg})")


def manifest_exists(path: str, storage: StorageConfig | None = None) -> bool:
    fs, inner = (storage or StorageConfig()).filesystem(path)
    return fs.get_file_info(inner).type.name == "File"


def read_manifest(
    path: str | Path, storage: StorageConfig | None = None
) -> tuple[list[ClipRecord], list[Rejected]]:
    """Parse a JSONL / Parquet manifest (local or s3://, with ``storage``'s S3 settings) into records
    (uris resolved) and rejects with reasons."""
    path = str(path)
    storage = storage or StorageConfig()
    if not manifest_exists(path, storage):
        raise ValueError(f"manifest: file not found: {path}")
    remote = "://" in path
    base = path.rsplit("/", 1)[0] if remote else os.path.dirname(os.path.abspath(path))
    good: list[ClipRecord] = []
    bad: list[Rejected] = []
    first_line: dict[str, int] = {}
    for line, row in _rows(storage.read_bytes(path), path.endswith(".parquet")):
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
            reason = f"duplicate clip_id (first seen on manifest line {first_line[rec.clip_id]})"
            bad.append(Rejected(line, rec.clip_id, reason, duplicate=True))
            continue
        first_line[rec.clip_id] = line
        update = {"uri": resolve_uri(rec.uri, base)}
        if rec.poses_uri:
            update["poses_uri"] = resolve_uri(rec.poses_uri, base)
        good.append(rec.model_copy(update=update))
    return good, bad


def write_manifest(
    records: Iterable[ClipRecord | dict], path: str | Path, storage: StorageConfig | None = None
) -> str | Path:
    """Write records as JSONL (``.jsonl``) or Parquet (``.parquet``), locally or to s3://."""
    # duck-typed: under `python -m astra.data.manifest` this module exists twice (__main__ and its
    # package name), and records built by astra.data.sources are the other copy's ClipRecord
    rows = [r.model_dump(exclude_none=True) if hasattr(r, "model_dump") else dict(r) for r in records]
    if str(path).endswith(".parquet"):
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buf)
        data = buf.getvalue()
    else:
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    if "://" in str(path):
        fs, inner = (storage or StorageConfig()).filesystem(str(path))
        write_atomic(fs, inner, data)
        return str(path)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    from astra.data import sources  # the builders (sources imports this module)

    parser = argparse.ArgumentParser(prog="python -m astra.data.manifest", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="layout", required=True)
    folder = sub.add_parser(
        "folder",
        help="every video under a folder or s3:// prefix (action-free unless a "
        "<name>.poses.npz sidecar is there); prompt from <name>.txt or --prompt",
    )
    folder.add_argument("root", help="local folder or s3://bucket/prefix")
    folder.add_argument("--modality", default="camera", help="modality of the clips (default camera)")
    folder.add_argument("--prompt", default="", help="prompt for clips without a <name>.txt sidecar")
    folder.add_argument("--dataset", default=None, help="dataset name (default: the folder's name)")
    spatial = sub.add_parser("spatialvid", help="a SpatialVID(-HQ) folder (videos/ + annotations/)")
    spatial.add_argument("root")
    sekai = sub.add_parser("sekai", help="a Sekai folder and its annotation CSV")
    sekai.add_argument("root")
    sekai.add_argument("csv")
    for p in (folder, spatial, sekai):
        p.add_argument("--out", required=True, help="manifest to write (.jsonl or .parquet; local or s3://)")
        p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint for s3:// paths")
    args = parser.parse_args(argv)
    storage = StorageConfig(s3_endpoint=args.s3_endpoint)
    try:
        if args.layout == "folder":
            records = sources.folder_records(args.root, args.modality, args.prompt, args.dataset, storage)
        elif args.layout == "spatialvid":
            records = sources.spatialvid_records(args.root)
        else:
            records = sources.sekai_records(args.root, args.csv)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    out = write_manifest(records, args.out, storage)
    actions = sum(1 for r in records if r.poses_uri)
    print(f"{out}: {len(records)} clips ({actions} with poses, {len(records) - actions} action-free)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
