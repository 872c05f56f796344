"""The CPU stage of the encode job: one manifest record -> sampled frames + per-latent action rows.

Kept free of torch / diffusers imports so the many decode worker processes start fast. A bad clip
never raises here: its row carries ``error`` (the quarantine reason) and ``stage``.
"""

from __future__ import annotations

import numpy as np

from astra.data.actions import MODALITY_RAW_DIMS, interpolate_states, latent_actions
from astra.data.manifest import ClipRecord
from astra.data.sources import load_poses
from astra.data.video import ClipError, decode_clip
from astra.encode.config import EncodeConfig

#: columns every row carries through the pipeline (the rest are stage payloads)
ROW_KEYS = (
    "clip_id",
    "dataset",
    "modality",
    "prompt",
    "source_uri",
    "fps",
    "error",
    "stage",
    "video_seconds",
)


def error_row(record: dict, stage: str, reason: str) -> dict:
    return {
        "clip_id": str(record.get("clip_id") or ""),
        "dataset": str(record.get("dataset") or ""),
        "modality": str(record.get("modality") or ""),
        "prompt": str(record.get("prompt") or ""),
        "source_uri": str(record.get("uri") or record.get("source_uri") or ""),
        "fps": 0.0,
        "error": reason,
        "stage": stage,
        "video_seconds": 0.0,
        "frames": b"",
        "actions": b"",
        "num_latents": 0,
    }


def decode_row(record: dict, config: EncodeConfig) -> dict:
    """One manifest record -> frames + action rows (CPU). Never raises for bad input."""
    video = config.video
    try:
        rec = ClipRecord.model_validate(record)
        raw_dim = config.actions.modality(rec.modality).raw_dim
        if rec.modality not in MODALITY_RAW_DIMS or MODALITY_RAW_DIMS[rec.modality] != raw_dim:
            raise ValueError(f"modality '{rec.modality}' has no action maths for raw_dim {raw_dim}")
        try:
            source = config.source_storage.open_binary(rec.uri)
        except (OSError, ValueError) as err:
            raise ClipError(f"cannot read {rec.uri}: {err}") from None
        with source:
            clip = decode_clip(source, video.num_frames, (video.height, video.width), video.fps, rec.fps)
        times, states = load_poses(rec, clip.source_fps, config.source_storage)
        frame_states = interpolate_states(rec.modality, times, states, clip.times)
        actions = latent_actions(rec.modality, frame_states)
    except (ClipError, ValueError, OSError, KeyError) as err:
        return error_row(record, "decode", str(err) or type(err).__name__)
    return {
        "clip_id": rec.clip_id,
        "dataset": rec.dataset,
        "modality": rec.modality,
        "prompt": rec.prompt,
        "source_uri": rec.uri,
        "fps": float(video.fps),
        "error": "",
        "stage": "",
        "video_seconds": (video.num_frames - 1) / video.fps,
        "frames": clip.frames.tobytes(),
        "actions": actions.astype(np.float32).tobytes(),
        "num_latents": len(actions),
    }
