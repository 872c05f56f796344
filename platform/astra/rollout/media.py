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
            img = cover_crop(img.convert("RGB"), size)
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise MediaError(f"{field}: not a readable PNG or JPEG image ({type(err).__name__})") from None
    except OSError as err:  # truncated or corrupt data
        raise MediaError(f"{field}: not a readable PNG or JPEG image ({err})") from None
    return np.asarray(img)


def cover_crop(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scaled to cover (height, width) and centre cropped. The crop is taken in the source's own
    pixels first and only it is resized, so a 40000x1 image costs a (height, width) resize, not the
    gigabytes that scaling the whole of it to cover would."""
    height, width = size
    w, h = img.size
    scale = max(height / h, width / w)
    crop_w, crop_h = width / scale, height / scale  # the part of the source that ends up visible
    left, top = (w - crop_w) / 2, (h - crop_h) / 2
    return img.resize((width, height), Image.Resampling.BICUBIC, box=(left, top, left + crop_w, top + crop_h))


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
