"""Clips and datasets: roll a world forward under actions, write MP4 + pose sidecar + manifest.

Files per clip, next to the manifest: ``<clip_id>.mp4`` (H.264, yuv420p, crf 18) and
``<clip_id>.poses.npz`` with ``times`` (N,) seconds (i / fps) and ``states`` (N, ...) canonical
poses (``pose_format: astra``). A dataset's world time per frame is 1 / fps, so other cars and
falling cubes move in real time at the written frame rate. Clip ids name the modality, the index
and the world seed (``camera-00003-w123456``), so a clip's world can be rebuilt with
``make_world(modality, seed, dt=1 / fps)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from astra.data.actions import MODALITY_RAW_DIMS
from astra.data.manifest import ClipRecord, write_manifest
from astra.data.synthetic.policies import branched_actions
from astra.data.synthetic.scene import render
from astra.data.synthetic.sim import SimState, initial_state, pose_of, step
from astra.data.synthetic.worlds import World, make_world, prompt_of
from astra.data.video import check_even, encode_mp4

MIXED_ORDER = ("camera", "driving", "robot")  # "mixed" datasets cycle through these


@dataclass(frozen=True)
class Clip:
    """A rendered rollout: frame i shows states[i]; actions[i] moved states[i] to states[i + 1]."""

    frames: np.ndarray  # (N, H, W, 3) uint8
    poses: np.ndarray  # (N, *pose_shape) float64 canonical poses
    states: list[SimState]  # (N) full simulation states, for re-rendering from any frame
    actions: np.ndarray  # (N - 1, raw_dim) float64


def rollout(world: World, start: SimState, actions: np.ndarray, size: tuple[int, int]) -> Clip:
    """Apply ``actions`` (N - 1, raw_dim) from ``start`` and render all N states (frame 0 = start)."""
    dim = MODALITY_RAW_DIMS[world.modality]
    actions = np.asarray(actions, dtype=np.float64).reshape(-1, dim)
    states = [start]
    for row in actions:
        states.append(step(world, states[-1], row))
    frames = np.stack([render(world, s, size) for s in states])
    return Clip(frames, np.stack([pose_of(s) for s in states]), states, actions)


def write_clip(clip: Clip, world: World, out_dir: Path, clip_id: str, fps: float) -> dict:
    """Write ``<clip_id>.mp4`` and ``<clip_id>.poses.npz`` into ``out_dir``; return the manifest record."""
    if not fps > 0:
        raise ValueError(f"fps: must be > 0, got {fps}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_even(clip.frames.shape[1], clip.frames.shape[2])  # before writing anything
    encode_mp4(clip.frames, out_dir / f"{clip_id}.mp4", fps)
    times = np.arange(len(clip.poses), dtype=np.float64) / fps
    np.savez(out_dir / f"{clip_id}.poses.npz", times=times, states=np.asarray(clip.poses, dtype=np.float64))
    record = {
        "clip_id": clip_id,
        "uri": f"{clip_id}.mp4",
        "dataset": "synthetic",
        "modality": world.modality,
        "prompt": prompt_of(world),
        "fps": float(fps),
        "poses_uri": f"{clip_id}.poses.npz",
        "pose_format": "astra",
    }
    ClipRecord.model_validate(record)  # fail here, not in the encode job, if the schema moved
    return record


def _derived_seed(seed: int, index: int, purpose: int) -> int:
    """Independent seeds per (dataset seed, clip, purpose) that do not depend on the clip count."""
    return int(np.random.SeedSequence((int(seed), int(index), purpose)).generate_state(1)[0] >> 1)


def write_dataset(
    out_dir: str | Path,
    num_clips: int,
    modality: str = "mixed",
    size: tuple[int, int] = (64, 64),
    num_frames: int = 33,
    fps: float = 16.0,
    seed: int = 0,
    actions_per_world: int = 1,
    shared_frames: int = 0,
) -> Path:
    """Render ``num_clips`` random clips of ``modality`` (or "mixed": camera, driving, robot in
    turn, world by world) into ``out_dir`` with a ``manifest.jsonl``; return the manifest path.

    ``actions_per_world`` = K > 1 renders K clips from each world's start state, each under its own
    action sequence: the same first frame with K different futures, the situation of an interactive
    rollout (and of the evaluation's distractors). A model can only tell those futures apart through
    the actions, so such data teaches action-following far more directly than one future per start,
    which a model can fit from the first frame alone.

    ``shared_frames`` = P > 0: the K clips of a world also share their first P actions (a trunk
    sequence per world, ``branched_actions``), so they show the same first P + 1 frames and branch
    after them. Then not only the first frame but a whole moving history has K futures that only
    the actions tell apart — the situation of every later chunk of a rollout. Measured on the demo
    camera world (1,600 clips, P = 8: a 3-latent shared history; 3,000 steps): the held-out action
    probe from such a history reached 66% (chance 25%) against 51% for clips that share only
    their first frame."""
    if modality != "mixed" and modality not in MODALITY_RAW_DIMS:
        raise ValueError(
            f"modality: expected one of {[*sorted(MODALITY_RAW_DIMS), 'mixed']}, got '{modality}'"
        )
    if num_clips < 0 or num_frames < 1:
        raise ValueError(
            f"num_clips / num_frames: need >= 0 clips of >= 1 frame, got {num_clips}, {num_frames}"
        )
    if actions_per_world < 1:
        raise ValueError(f"actions_per_world: need >= 1, got {actions_per_world}")
    size = (int(size[0]), int(size[1]))
    check_even(*size)
    out_dir = Path(out_dir)
    records = []
    for i in range(num_clips):
        w = i // actions_per_world  # the world's index (K = 1: the clip's own)
        m = MIXED_ORDER[w % len(MIXED_ORDER)] if modality == "mixed" else modality
        world_seed = _derived_seed(seed, w, 0)
        world = make_world(m, world_seed, dt=1.0 / fps)
        trunk = _derived_seed(seed, w, 2)
        actions = branched_actions(world, num_frames, _derived_seed(seed, i, 1), trunk, shared_frames)
        clip = rollout(world, initial_state(world), actions, size)
        records.append(write_clip(clip, world, out_dir, f"{m}-{i:05d}-w{world_seed}", fps))
    return write_manifest(records, out_dir / "manifest.jsonl")
