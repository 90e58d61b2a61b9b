"""Turning whatever image arrays callers hold into the RGB uint8 (H, W, 3) that every stage works on."""

from __future__ import annotations

import numpy as np


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
