"""Turning encoded bytes, or whatever image arrays callers hold, into the RGB uint8 (H, W, 3) that every stage works
on; and a video's bytes into frames sampled at a rate (`c3ae predict` and `c3ae score` take videos)."""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from collections.abc import Iterator

import cv2
import numpy as np

from c3ae_ray.config import UserError


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Gray (H, W) or (H, W, 1) -> replicated; RGBA -> alpha dropped; 16-bit -> top 8 bits; floats in [0, 1] -> x255.

    Anything else (wrong rank, 2 or 5+ channels, empty) is a ValueError that says what was given.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"expected an image of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {image.shape}")
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype.kind == "f":
        image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ValueError(f"expected uint8, uint16 or float pixels, got {image.dtype}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.shape[2] == 4:
        image = image[:, :, :3]
    return np.ascontiguousarray(image)


DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000: larger inputs are refused before they are decoded


class ImageError(UserError):
    """An input that is not a usable image; `reason` is a short code for counts and error rows."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header alone, or None when Pillow cannot identify the format.

    Pillow refuses headers over twice its own limit (about 179 Mpx) outright: those are too large here too.
    """
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as header:
                return header.size
    except Image.DecompressionBombError as error:
        raise ImageError("too_large", str(error)) from None
    except Exception:
        return None


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded bytes -> RGB uint8 (H, W, 3), EXIF orientation applied; raises ImageError.

    The pixel cap is checked on the header before decoding, so a decompression bomb costs nothing.
    OpenCV decodes (ANYDEPTH | ANYCOLOR keeps 16-bit and gray, and honours EXIF orientation).
    """
    if not data:
        raise ImageError("empty", "empty file")
    size = image_size(data)
    if size is not None and size[0] * size[1] > max_pixels:
        raise ImageError("too_large", f"{size[0]}x{size[1]} pixels is over the cap of {max_pixels:,}")
    try:
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    except cv2.error as error:  # OpenCV's own checks, on a header Pillow could not read
        if "validateInputImageSize" in str(error):
            raise ImageError("too_large", "the header claims a size over OpenCV's limits") from None
        raise ImageError("undecodable", "not a decodable image (OpenCV refused its header)") from None
    if decoded is None or decoded.size == 0:
        raise ImageError("undecodable", "not a decodable image (corrupt, truncated or unsupported format)")
    if decoded.shape[0] * decoded.shape[1] > max_pixels:
        raise ImageError("too_large", f"{decoded.shape[1]}x{decoded.shape[0]} pixels is over the cap of {max_pixels:,}")
    if decoded.ndim == 3 and decoded.shape[2] == 2:  # gray and alpha (a TIFF's LA): the gray
        decoded = decoded[:, :, 0]
    if decoded.ndim == 3:
        decoded = cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
    try:
        return to_rgb_uint8(decoded)
    except ValueError as error:  # 32-bit integer pixels (a TIFF's mode I), say: no photo's layout
        raise ImageError("undecodable", f"unsupported pixel layout: {error}") from None


def read_file(path) -> bytes:
    """A local file's bytes; one that cannot be read is ImageError('read_error')."""
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise ImageError("read_error", error.strerror or str(error)) from None


def read_image(path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A local image file -> RGB uint8, as `decode_image`; a file that cannot be read is ImageError('read_error')."""
    return decode_image(read_file(path), max_pixels)


VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm"})
DEFAULT_FPS = 1.0  # video frames sampled per second


def is_video(path: str) -> bool:
    return os.path.splitext(str(path))[1].lower() in VIDEO_EXTENSIONS


def decode_video(data: bytes, fps: float = DEFAULT_FPS, max_pixels: int = DEFAULT_MAX_PIXELS,
                 suffix: str = ".mp4") -> Iterator[tuple[float, np.ndarray]]:
    """Encoded video -> (seconds from its start, RGB uint8 frame), one frame every 1/fps seconds from the first
    (the first frame at or after each sampling time), yielded as decoded so a long video never sits in memory
    whole. A video with no decodable frame raises ImageError on the first `next()`.

    OpenCV's FFmpeg reads from a path, so the bytes pass through a temporary file (`suffix` helps it guess the
    container). Frames are decoded in order, which every container supports; only the sampled ones are kept.
    """
    if not data:
        raise ImageError("empty", "empty file")
    index, due = 0, 0.0
    with tempfile.NamedTemporaryFile(suffix=suffix) as file:
        file.write(data)
        file.flush()
        capture = cv2.VideoCapture(file.name, cv2.CAP_FFMPEG)
        try:
            rate = capture.get(cv2.CAP_PROP_FPS) if capture.isOpened() else 0.0
            while capture.isOpened():
                ok, frame = capture.read()
                if not ok:
                    break
                time_s = index / rate if rate > 0 else capture.get(cv2.CAP_PROP_POS_MSEC) / 1000
                index += 1
                if time_s + 1e-6 < due:
                    continue
                if frame.shape[0] * frame.shape[1] > max_pixels:
                    raise ImageError("too_large", f"{frame.shape[1]}x{frame.shape[0]} frames are over the cap of {max_pixels:,} pixels")
                yield round(time_s, 3), to_rgb_uint8(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
                while due <= time_s + 1e-6:
                    due += 1 / fps
        finally:
            capture.release()
    if index == 0:
        raise ImageError("undecodable", "not a decodable video (corrupt, truncated or unsupported format)")
