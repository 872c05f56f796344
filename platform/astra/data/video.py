"""Video decode with PyAV: sample 1 + 4k frames at a target fps, resize + centre-crop, uint8 RGB.

Frames are decoded in order and only the ones nearest to the target times t_k = k / target_fps
are converted (swscale resize in C, then a numpy centre crop), so memory stays at the output size
whatever the source resolution. The *actual* timestamps of the chosen frames are returned, so poses
are interpolated at exactly the instants the pixels show.
"""

from __future__ import annotations

from dataclasses import dataclass

import av
import numpy as np


class ClipError(ValueError):
    """A clip that cannot be used; the message is the quarantine reason."""


@dataclass(frozen=True)
class DecodedClip:
    frames: np.ndarray  # (N, H, W, 3) uint8
    times: np.ndarray  # (N,) seconds of each chosen frame
    source_fps: float


def _resize_crop(frame: av.VideoFrame, height: int, width: int) -> np.ndarray:
    scale = max(height / frame.height, width / frame.width)
    new_h, new_w = max(height, round(frame.height * scale)), max(width, round(frame.width * scale))
    img = frame.reformat(width=new_w, height=new_h, format="rgb24").to_ndarray()
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return img[top : top + height, left : left + width]


def decode_clip(
    source,
    num_frames: int,
    size: tuple[int, int],
    target_fps: float,
    fps: float | None = None,
) -> DecodedClip:
    """Decode ``num_frames`` frames at ``target_fps`` from the start of ``source`` (path or file object).

    Raises ClipError with a readable reason for empty, truncated, non-video or too-short inputs.
    """
    height, width = size
    targets = np.arange(num_frames) / target_fps
    if hasattr(source, "seek"):
        if source.seek(0, 2) == 0:
            raise ClipError("empty file (0 bytes)")
        source.seek(0)
    try:
        container = av.open(source)
    except (av.error.FFmpegError, OSError, ValueError) as err:
        raise ClipError(f"not a readable video ({type(err).__name__}: {err})") from None
    with container:
        if not container.streams.video:
            raise ClipError("no video stream in the file")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = fps or (float(stream.average_rate) if stream.average_rate else None)
        if not rate:
            raise ClipError("unknown frame rate: set fps in the manifest")
        chosen: list[np.ndarray] = []
        times: list[float] = []
        prev: tuple[float, av.VideoFrame] | None = None
        index = 0
        try:
            for index, frame in enumerate(container.decode(stream)):
                t = float(frame.time) if frame.time is not None and fps is None else index / rate
                # settle every target that lies at or before this frame: nearest of prev / this
                while len(chosen) < num_frames and targets[len(chosen)] <= t:
                    target = targets[len(chosen)]
                    use = prev if prev is not None and abs(prev[0] - target) < abs(t - target) else (t, frame)
                    chosen.append(_resize_crop(use[1], height, width))
                    times.append(use[0])
                if len(chosen) == num_frames:
                    break
                prev = (t, frame)
        except av.error.FFmpegError as err:
            # a truncated file: keep what decoded, decide below
            if not chosen and prev is None:
                raise ClipError(f"undecodable video ({type(err).__name__}: {err})") from None
        # targets after the last frame but within one frame interval of it take the last frame
        while prev is not None and len(chosen) < num_frames and targets[len(chosen)] - prev[0] <= 0.5 / rate:
            chosen.append(_resize_crop(prev[1], height, width))
            times.append(prev[0])
    if len(chosen) < num_frames:
        have = len(chosen)
        raise ClipError(
            f"too few frames: need {num_frames} at {target_fps:g} fps "
            f"({(num_frames - 1) / target_fps:.2f} s), the video gives {have} (decoded {index + 1} frames at {rate:g} fps)"
        )
    return DecodedClip(np.stack(chosen), np.asarray(times), float(rate))
