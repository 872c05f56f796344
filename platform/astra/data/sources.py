"""Pose sources and manifest builders for the dataset layouts Astra trains on.

``load_poses(record, video_fps)`` returns ``(times in seconds (N,), canonical states)`` (see
``astra.data.actions``) for each ``pose_format``:

* ``astra``      — our own sidecar (the synthetic worlds write it): ``.npz`` with ``times`` and ``states``.
* ``spatialvid`` — a SpatialVID annotation folder ``annotations/group_XXXX/<clip_id>/``: ``poses.npy``
  (N, 7) world-to-camera ``[tx, ty, tz, qx, qy, qz, qw]`` with OpenCV axes (MegaSaM's output, sampled at
  ~5 fps), ``indexes.txt`` (``<i> <video frame index>`` per pose) and ``caption.json``.
* ``sekai``      — a Sekai camera file: one line per video frame holding a 4x4 world-to-camera extrinsic
  matrix, row-major (16 numbers, optionally preceded by the frame index), OpenCV axes; or the same
  as an (N, 4, 4) ``.npy``. Frame i is at i / pose_fps (default: the video's fps).

OpenCV cameras (+Z forward, +Y down) are converted to our OpenGL convention (-Z forward, +Y up).
The builders turn a dataset folder into manifest records (``astra.data.manifest``, whose command line
runs them): SpatialVID, Sekai, and a plain folder / S3 prefix of videos with optional sidecars.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs

from astra.data.actions import opencv_c2w_to_opengl, quat_to_matrix
from astra.data.manifest import ClipRecord, write_manifest
from astra.data.storage import StorageConfig

LOCAL = StorageConfig()


def _w2c_quat_to_c2w(poses: np.ndarray) -> np.ndarray:
    """(N, 7) [t, q xyzw] world-to-camera -> (N, 4, 4) camera-to-world."""
    w2c = np.tile(np.eye(4), (len(poses), 1, 1))
    w2c[:, :3, :3] = quat_to_matrix(poses[:, [6, 3, 4, 5]])  # xyzw -> wxyz
    w2c[:, :3, 3] = poses[:, :3]
    return np.linalg.inv(w2c)


def _load_npy(uri: str, storage: StorageConfig) -> np.ndarray:
    return np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False)


def load_spatialvid(
    folder: str, video_fps: float, pose_fps: float | None, storage: StorageConfig = LOCAL
) -> tuple[np.ndarray, np.ndarray]:
    poses = _load_npy(f"{folder}/poses.npy", storage).astype(np.float64)
    if poses.ndim != 2 or poses.shape[1] != 7:
        raise ValueError(f"poses: SpatialVID poses.npy must be (N, 7), got {poses.shape}")
    try:
        lines = storage.read_bytes(f"{folder}/indexes.txt").decode().split("\n")
        frames = np.array([float(ln.split()[1]) for ln in lines if len(ln.split()) == 2])
        times = frames / video_fps
    except (FileNotFoundError, OSError):
        times = np.arange(len(poses)) / (pose_fps or 5.0)
    if len(times) != len(poses):
        raise ValueError(f"poses: {len(poses)} poses but {len(times)} frame indexes in indexes.txt")
    return times, opencv_c2w_to_opengl(_w2c_quat_to_c2w(poses))


def load_sekai(
    uri: str, video_fps: float, pose_fps: float | None, storage: StorageConfig = LOCAL
) -> tuple[np.ndarray, np.ndarray]:
    if uri.endswith(".npy"):
        mats = _load_npy(uri, storage).astype(np.float64)
    else:
        rows = [ln.split() for ln in storage.read_bytes(uri).decode().splitlines() if ln.strip()]
        if any(len(r) not in (16, 17) for r in rows):
            raise ValueError(
                "poses: a Sekai camera line must hold 16 numbers (optionally after a frame index)"
            )
        mats = np.array([[float(v) for v in r[-16:]] for r in rows]).reshape(-1, 4, 4)
    if mats.ndim != 3 or mats.shape[1:] != (4, 4):
        raise ValueError(f"poses: Sekai extrinsics must be (N, 4, 4), got {mats.shape}")
    times = np.arange(len(mats)) / (pose_fps or video_fps)
    return times, opencv_c2w_to_opengl(np.linalg.inv(mats))


def load_astra(uri: str, storage: StorageConfig = LOCAL) -> tuple[np.ndarray, np.ndarray]:
    with np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False) as z:
        if "times" not in z or "states" not in z:
            raise ValueError("poses: an astra pose file needs arrays 'times' and 'states'")
        return z["times"].astype(np.float64), z["states"].astype(np.float64)


def load_poses(
    record: ClipRecord, video_fps: float, storage: StorageConfig = LOCAL
) -> tuple[np.ndarray, np.ndarray]:
    """(times (N,), canonical states) of a clip; ``storage`` holds the S3 settings for s3:// uris.
    Raises ValueError / OSError on bad or missing poses."""
    if record.poses_uri is None:
        raise ValueError("poses: the manifest record has no poses_uri")
    if record.pose_format == "spatialvid":
        return load_spatialvid(record.poses_uri, video_fps, record.pose_fps, storage)
    if record.pose_format == "sekai":
        return load_sekai(record.poses_uri, video_fps, record.pose_fps, storage)
    return load_astra(record.poses_uri, storage)


# ----------------------------------------------------------------------------- manifest builders


def _caption(folder: Path) -> str:
    path = folder / "caption.json"
    if not path.is_file():
        return ""
    data = json.loads(path.read_text())
    if isinstance(data, str):
        return data
    for key in ("SceneDescription", "SceneSummary", "caption", "Caption"):
        if isinstance(data.get(key), str):
            return data[key]
    return next((v for v in data.values() if isinstance(v, str)), "")


def spatialvid_records(root: str | Path) -> list[ClipRecord]:
    """Records of a SpatialVID(-HQ) folder: ``videos/group_*/<id>.mp4`` + ``annotations/group_*/<id>/``."""
    root = Path(root)
    records = []
    for folder in sorted((root / "annotations").glob("group_*/*")):
        if not (folder / "poses.npy").is_file():
            continue
        video = root / "videos" / folder.parent.name / f"{folder.name}.mp4"
        records.append(
            ClipRecord(
                clip_id=f"spatialvid/{folder.name}",
                uri=str(video.resolve()),
                dataset="spatialvid",
                modality="camera",
                prompt=_caption(folder),
                poses_uri=str(folder.resolve()),
                pose_format="spatialvid",
            )
        )
    if not records:
        raise ValueError(f"{root}: no annotations/group_*/<clip>/poses.npy found (not a SpatialVID folder)")
    return records


def build_spatialvid_manifest(root: str | Path, out: str | Path) -> Path:
    return write_manifest(spatialvid_records(root), out)


def sekai_records(root: str | Path, csv_path: str | Path) -> list[ClipRecord]:
    """Records of a Sekai folder from its annotation CSV (columns ``videoFile``, ``cameraFile``,
    ``caption``; optional ``fps``): videos under ``root/videos``, camera files under ``root/cameras``."""
    root = Path(root)
    records = []
    with open(csv_path, newline="") as fh:
        for row in csv.DictReader(fh):
            missing = {"videoFile", "cameraFile"} - set(row)
            if missing:
                raise ValueError(f"{csv_path}: Sekai CSV lacks columns {sorted(missing)}")
            stem = Path(row["videoFile"]).stem
            records.append(
                ClipRecord(
                    clip_id=f"sekai/{stem}",
                    uri=str((root / "videos" / row["videoFile"]).resolve()),
                    dataset="sekai",
                    modality="camera",
                    prompt=row.get("caption", ""),
                    fps=float(row["fps"]) if row.get("fps") else None,
                    poses_uri=str((root / "cameras" / row["cameraFile"]).resolve()),
                    pose_format="sekai",
                )
            )
    return records


def build_sekai_manifest(root: str | Path, csv_path: str | Path, out: str | Path) -> Path:
    return write_manifest(sekai_records(root, csv_path), out)


VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")


def folder_records(
    root: str,
    modality: str = "camera",
    prompt: str = "",
    dataset: str | None = None,
    storage: StorageConfig = LOCAL,
) -> list[ClipRecord]:
    """Records of every video under a local folder or ``s3://`` prefix (any depth).

    Clip id: ``<dataset>/<path below root without suffix>``. Sidecars next to a video ``x.mp4``:
    ``x.txt`` holds its prompt (else ``prompt``), ``x.poses.npz`` its poses in the ``astra`` format
    (else the clip is action-free). Uris are absolute paths or ``s3://`` uris."""
    remote = "://" in root
    fs, base = storage.filesystem(root)
    if fs.get_file_info(base).type.name != "Directory":
        raise ValueError(f"root: not a folder or prefix: {root}")
    files = {f.path: f for f in fs.get_file_info(pafs.FileSelector(base, recursive=True)) if f.is_file}
    dataset = dataset or base.rstrip("/").rsplit("/", 1)[-1]

    def uri(path: str) -> str:
        return f"s3://{path}" if remote else path

    records = []
    for path in sorted(files):
        stem, suffix = os.path.splitext(path)
        if suffix.lower() not in VIDEO_SUFFIXES:
            continue
        text = f"{stem}.txt"
        caption = storage.read_bytes(uri(text)).decode().strip() if text in files else prompt
        poses = f"{stem}.poses.npz"
        records.append(
            ClipRecord(
                clip_id=f"{dataset}/{stem[len(base) :].lstrip('/')}",
                uri=uri(path),
                dataset=dataset,
                modality=modality,
                prompt=caption,
                poses_uri=uri(poses) if poses in files else None,
                pose_format="astra",
            )
        )
    if not records:
        raise ValueError(f"root: no videos ({', '.join(VIDEO_SUFFIXES)}) under {root}")
    return records
