"""Pictures in and out of the rollout service: start images and clips, JPEG frames, the MP4.

Start images are PNG or JPEG (Pillow); their size is checked from the header *before* decoding, so a
decompression bomb is refused cheaply. They are resized to cover the service's video size and centre
cropped, the way the encode job treats clips. Start clips are decoded by the encode job's own PyAV
reader. Every problem is a ``MediaError`` (a ValueError) whose message starts with the field's name.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from astra.data.video import ClipError, decode_windows, encode_mp4


class MediaError(ValueError):
    """A start image or clip that cannot be used; the message names the field."""


def decode_image(data: bytes, size: tuple[int, int], max_pixels: int, field: str = "image") -> np.ndarray:
    """PNG / JPEG bytes -> (H, W, 3) uint8 at ``size`` = (height, width)."""
    if not data:
        raise MediaError(f"{field}: empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format not in ("PNG", "JPEG"):
                raise MediaError(f"{field}: expected a PNG or JPEG image, got {img.format or 'unknown'}")
            width, height = img.size
            if width * height > max_pixels:
                raise MediaError(
                    f"{field}: {width}x{height} pixels exceed limits.max_image_pixels ({max_pixels})"
                )
            img = img.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise MediaError(f"{field}: not a readable PNG or JPEG image ({type(err).__name__})") from None
    except OSError as err:  # truncated or corrupt data
        raise MediaError(f"{field}: not a readable PNG or JPEG image ({err})") from None
    return cover_crop(np.asarray(img), size)


def cover_crop(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w, 3) uint8 -> (H, W, 3): scaled to cover, centre cropped."""
    height, width = size
    h, w = frame.shape[:2]
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    img = np.asarray(Image.fromarray(frame).resize((new_w, new_h), Image.Resampling.BICUBIC))
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return np.ascontiguousarray(img[top : top + height, left : left + width])


def decode_start_clip(
    data: bytes, size: tuple[int, int], fps: float, max_frames: int, field: str = "clip"
) -> np.ndarray:
    """A video -> its first 1 + 4k frames (at most ``max_frames``) at ``fps``: (N, H, W, 3) uint8."""
    if not data:
        raise MediaError(f"{field}: empty")
    max_frames = 1 + 4 * ((max_frames - 1) // 4)
    try:
        window = next(decode_windows(io.BytesIO(data), size, fps, max_frames, 1, 1))
    except ClipError as err:
        raise MediaError(f"{field}: {err}") from None
    return window.frames


def jpeg(frame: np.ndarray, quality: int) -> bytes:
    """(H, W, 3) uint8 -> JPEG bytes."""
    out = io.BytesIO()
    Image.fromarray(frame).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def mp4(frames: np.ndarray, fps: float) -> bytes:
    """(N, H, W, 3) uint8 -> H.264 MP4 bytes."""
    out = io.BytesIO()
    encode_mp4(frames, out, fps)
    return out.getvalue()
