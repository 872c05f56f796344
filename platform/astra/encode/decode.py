"""The CPU stage of the encode job: one manifest record -> its windows (sampled frames + action rows).

Kept free of torch / diffusers imports so the many decode worker processes start fast. A bad clip
never raises here: it yields one row carrying ``error`` (the quarantine reason) and ``stage`` —
``poses`` (the pose file or its timing), ``read`` (the video cannot be opened) or ``decode`` (not a
video, too short). Poses are read *before* the video is decoded, so a clip with broken poses costs no
decoding, and the video is only decoded as far as the poses reach.

A clip without ``poses_uri`` (the plan has already checked its modality may go without) is
*action-free*: its rows carry no action rows, and training uses it as plain video / null actions.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from astra.data.actions import interpolate_states, latent_actions
from astra.data.manifest import ClipRecord
from astra.data.sources import load_poses
from astra.data.video import ClipError, decode_windows, probe_fps
from astra.encode.config import EncodeConfig


def window_id(source_clip_id: str, window: int) -> str:
    """Row id of window ``window`` of a clip: the clip's own id for the first, ``id#k`` after."""
    return source_clip_id if window == 0 else f"{source_clip_id}#{window}"


def error_row(record: dict, stage: str, reason: str) -> dict:
    cid = str(record.get("clip_id") or "")
    return {
        "clip_id": cid,
        "source_clip_id": cid,
        "window": 0,
        "last_window": True,
        "start_seconds": 0.0,
        "dataset": str(record.get("dataset") or ""),
        "modality": str(record.get("modality") or ""),
        "prompt": str(record.get("prompt") or ""),
        "source_uri": str(record.get("uri") or record.get("source_uri") or ""),
        "fps": 0.0,
        "error": reason,
        "stage": stage,
        "video_seconds": 0.0,
        "frames": b"",
        "num_frames": 0,
        "actions": b"",
        "num_action_rows": 0,
    }


def _reason(err: Exception) -> str:
    return str(err) or type(err).__name__


class DecodeTimeout(Exception):
    """A clip's read or decode passed ``compute.decode_timeout_s``."""


@contextmanager
def _deadline(seconds: float | None):
    """Raise DecodeTimeout in this thread after ``seconds`` — also out of a blocking read (SIGALRM
    interrupts the system call). A no-op off the main thread, where signals cannot be used; reads
    blocked inside C++ (pyarrow's S3 client) end at that client's own timeouts."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def fire(signum, frame):
        raise DecodeTimeout

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def decode_windows_of(record: dict, config: EncodeConfig, tracker=None) -> Iterator[dict]:
    """One manifest record (plus ``done_windows``: windows already stored) -> one row per window still
    to encode, or one error row. Never raises for bad input; each window must come within
    ``compute.decode_timeout_s`` (the clock stops while a finished window is handed on)."""
    if tracker is not None:
        tracker.begin.remote("decode", record["clip_id"], record.get("uri", ""))
    windows, produced = _windows(record, config), 0
    limit = config.compute.decode_timeout_s
    try:
        while True:
            try:
                with _deadline(limit):
                    row = next(windows)
            except StopIteration:
                return
            except DecodeTimeout:
                windows.close()
                stage = "decode" if produced else "read"
                yield error_row(
                    record, stage, f"timed out: no window after {limit:g} s (compute.decode_timeout_s)"
                )
                return
            produced += 1
            yield row
    finally:
        if tracker is not None:
            tracker.end.remote("decode", record["clip_id"])


def _windows(record: dict, config: EncodeConfig) -> Iterator[dict]:
    video, storage = config.video, config.source_storage
    done = {int(w) for w in str(record.get("done_windows") or "").split(",") if w}
    rec = ClipRecord.model_validate({k: v for k, v in record.items() if k != "done_windows"})
    try:
        source = storage.open_binary(rec.uri)
    except (OSError, ValueError) as err:
        yield error_row(record, "read", f"cannot read {rec.uri}: {_reason(err)}")
        return
    with source:
        poses, until = None, None
        if rec.poses_uri:
            try:  # pose files that count video frames need the video's frame rate
                fps = rec.fps or probe_fps(source)
            except ClipError as err:
                yield error_row(record, "decode", _reason(err))
                return
            try:
                poses = load_poses(rec, fps, storage)
                until = float(poses[0][-1]) + 1e-3  # decode no further than the poses reach
            except (ValueError, OSError, KeyError) as err:
                yield error_row(record, "poses", _reason(err))
                return
        windows = decode_windows(
            source,
            (video.height, video.width),
            video.fps,
            video.max_frames,
            video.min_frames,
            video.max_windows,
            rec.fps,
            until,
        )
        try:
            for win in windows:
                if win.window in done:
                    continue
                actions = np.zeros((0, config.actions.modality(rec.modality).raw_dim), np.float32)
                if poses is not None:
                    try:
                        states = interpolate_states(rec.modality, *poses, win.times)
                        actions = latent_actions(rec.modality, states).astype(np.float32)
                    except ValueError as err:
                        yield error_row(record, "poses", _reason(err))
                        return
                yield {
                    "clip_id": window_id(rec.clip_id, win.window),
                    "source_clip_id": rec.clip_id,
                    "window": win.window,
                    "last_window": win.last,
                    "start_seconds": float(win.times[0]),
                    "dataset": rec.dataset,
                    "modality": rec.modality,
                    "prompt": rec.prompt,
                    "source_uri": rec.uri,
                    "fps": float(video.fps),
                    "error": "",
                    "stage": "",
                    "video_seconds": (len(win.frames) - 1) / video.fps,
                    "frames": win.frames.tobytes(),
                    "num_frames": len(win.frames),
                    "actions": actions.tobytes(),
                    "num_action_rows": len(actions),
                }
        except (ClipError, ValueError, OSError) as err:
            yield error_row(record, "decode", _reason(err))
