"""Video decode (and encode) with PyAV: frames sampled at a target fps, resized + centre-cropped, in windows of 1 + 4k.

Frames are decoded in order and only the ones nearest to the target times t_k = k / target_fps are
converted (swscale resize in C, then a numpy centre crop), so memory stays at the output size whatever
the source resolution. The *actual* timestamps of the chosen frames are returned, so poses are
interpolated at exactly the instants the pixels show.

A clip is cut into consecutive windows of ``max_frames`` samples (1 + 4k, the VAE's grouping); window
k + 1 starts on window k's last sample, so the windows tile the clip without a gap. The final window
is the longest 1 + 4k that the rest of the clip gives, kept if it has at least ``min_frames``. Windows
are yielded one at a time (memory: about two windows, however long the video), each flagged ``last``
or not, so a consumer always knows when a clip is complete.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


class ClipError(ValueError):
    """A clip that cannot be used; the message is the quarantine reason."""


@dataclass(frozen=True)
class DecodedClip:
    frames: np.ndarray  # (N, H, W, 3) uint8, N = 1 + 4k
    times: np.ndarray  # (N,) seconds of each chosen frame
    source_fps: float
    window: int = 0  # index of this window in the clip
    last: bool = True  # no window follows


def _resize_crop(frame: av.VideoFrame, height: int, width: int) -> np.ndarray:
    scale = max(height / frame.height, width / frame.width)
    new_h, new_w = max(height, round(frame.height * scale)), max(width, round(frame.width * scale))
    img = frame.reformat(width=new_w, height=new_h, format="rgb24").to_ndarray()
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return img[top : top + height, left : left + width]


@dataclass
class _Counter:
    decoded: int = 0  # frames the container gave
    rate: float = 0.0


def _samples(
    container,
    size: tuple[int, int],
    target_fps: float,
    fps: float | None,
    limit: int,
    until: float | None,
    seen: _Counter,
) -> Iterator[tuple[float, np.ndarray]]:
    """(time, frame) nearest to each target time k / target_fps, k < limit, up to ``until`` seconds."""
    if not container.streams.video:
        raise ClipError("no video stream in the file")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    rate = fps or (float(stream.average_rate) if stream.average_rate else None)
    if not rate:
        raise ClipError("unknown frame rate: set fps in the manifest")
    seen.rate = rate
    k, prev = 0, None  # next target index; (time, frame) of the previous decoded frame

    def target(i: int) -> float:
        return i / target_fps

    try:
        for index, frame in enumerate(container.decode(stream)):
            seen.decoded = index + 1
            t = float(frame.time) if frame.time is not None and fps is None else index / rate
            # settle every target at or before this frame: the nearer of prev / this
            while k < limit and target(k) <= t and (until is None or target(k) <= until):
                use = (
                    prev if prev is not None and abs(prev[0] - target(k)) < abs(t - target(k)) else (t, frame)
                )
                yield use[0], _resize_crop(use[1], *size)
                k += 1
            if k == limit or (until is not None and target(k) > until):
                return
            prev = (t, frame)
    except av.error.FFmpegError as err:
        # a truncated file: what decoded is the clip
        if prev is None and k == 0:
            raise ClipError(f"undecodable video ({type(err).__name__}: {err})") from None
    # targets after the last frame but within half a frame interval of it take the last frame
    while prev is not None and k < limit and target(k) - prev[0] <= 0.5 / rate:
        if until is not None and target(k) > until:
            return
        yield prev[0], _resize_crop(prev[1], *size)
        k += 1


def _open(source):
    if hasattr(source, "seek"):
        if source.seek(0, 2) == 0:
            raise ClipError("empty file (0 bytes)")
        source.seek(0)
    try:
        return av.open(source)
    except (av.error.FFmpegError, OSError, ValueError) as err:
        raise ClipError(f"not a readable video ({type(err).__name__}: {err})") from None


def probe_fps(source) -> float:
    """The video's average frame rate from its header (no decoding); rewinds a file object."""
    with _open(source) as container:
        if not container.streams.video:
            raise ClipError("no video stream in the file")
        stream = container.streams.video[0]
        rate = float(stream.average_rate) if stream.average_rate else 0.0
    if hasattr(source, "seek"):
        source.seek(0)
    if not rate:
        raise ClipError("unknown frame rate: set fps in the manifest")
    return rate


def decode_windows(
    source,
    size: tuple[int, int],
    target_fps: float,
    max_frames: int,
    min_frames: int,
    max_windows: int = 1,
    fps: float | None = None,
    until: float | None = None,
) -> Iterator[DecodedClip]:
    """Decode ``source`` (path or file object) into windows of ``max_frames`` frames at ``target_fps``
    (the final one may be shorter, down to ``min_frames``); at most ``max_windows``; nothing after
    ``until`` seconds (e.g. where the poses end).

    Raises ClipError with a readable reason for empty, non-video or too-short inputs (before yielding
    anything: a clip either gives at least one window or none).
    """
    assert (max_frames - 1) % 4 == 0 and (min_frames - 1) % 4 == 0 and min_frames <= max_frames
    container = _open(source)
    stride = max_frames - 1  # window k+1 starts on window k's last sample
    seen = _Counter()
    with container:
        frames: list[np.ndarray] = []
        times: list[float] = []
        window, pending = 0, None  # a finished window held back until we know whether it is the last
        # samples that prove a next window exists (>= 5: a 1-frame tail would only repeat the boundary)
        next_exists = max(min_frames, 5)
        for t, img in _samples(container, size, target_fps, fps, stride * max_windows + 1, until, seen):
            frames.append(img)
            times.append(t)
            if pending is not None and len(frames) >= next_exists:
                yield pending  # the next window will exist: this one is not the last
                pending = None
            if len(frames) == max_frames:
                pending = DecodedClip(np.stack(frames), np.asarray(times), seen.rate, window, last=False)
                window += 1
                frames, times = frames[-1:], times[-1:]
    usable = 1 + 4 * ((len(frames) - 1) // 4) if frames else 0
    tail = None
    if usable >= min_frames and (pending is None or usable >= 5):
        tail = DecodedClip(
            np.stack(frames[:usable]), np.asarray(times[:usable]), seen.rate, window, last=True
        )
    if pending is not None:
        yield DecodedClip(
            pending.frames, pending.times, pending.source_fps, pending.window, last=tail is None
        )
    if tail is not None:
        yield tail
    elif pending is None:
        limit = f"; the poses end at {until:.2f} s" if until is not None else ""
        raise ClipError(
            f"too few frames: need at least {min_frames} at {target_fps:g} fps "
            f"({(min_frames - 1) / target_fps:.2f} s), the video gives {len(frames)} "
            f"(decoded {seen.decoded} frames at {seen.rate:g} fps{limit})"
        )


def decode_clip(
    source, num_frames: int, size: tuple[int, int], target_fps: float, fps: float | None = None
) -> DecodedClip:
    """Exactly ``num_frames`` (1 + 4k) frames from the start of ``source``; ClipError if it is shorter."""
    return next(decode_windows(source, size, target_fps, num_frames, num_frames, 1, fps))


# ----------------------------------------------------------------------------- writing


def check_even(height: int, width: int) -> None:
    if height % 2 or width % 2 or height < 2 or width < 2:
        raise ValueError(f"size: H.264 yuv420p needs an even height and width, got {height}x{width}")


def encode_mp4(frames: np.ndarray, path: Path | io.BytesIO, fps: float, crf: int = 18) -> None:
    """Write (N, H, W, 3) uint8 RGB frames as H.264 yuv420p at ``fps`` to a path or a binary file object
    (a file gets its ``moov`` first, so a browser plays it before it has all of it)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames: expected (N, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    check_even(frames.shape[1], frames.shape[2])
    rate = Fraction(fps).limit_denominator(1001)  # 29.97 -> 2997/100 exactly, 16.0 -> 16
    in_memory = hasattr(path, "write")  # faststart re-reads the file: paths only
    options = {} if in_memory else {"movflags": "faststart"}
    with av.open(path if in_memory else str(path), "w", format="mp4", options=options) as container:
        stream = container.add_stream("libx264", rate=rate, options={"crf": str(crf), "preset": "medium"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for img in frames:
            # the encoder converts rgb24 -> yuv420p (BT.601, limited range, as decoders assume)
            container.mux(
                stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24"))
            )
        container.mux(stream.encode())  # flush delayed frames
