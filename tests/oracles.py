"""Reference implementations that tests check the package against (they never ship).

`sample_crops` samples each context box with plain numpy, written from the definition (bilinear at pixel
centres, reflect padding); `augment.crop_batch` with augmentation off must give the same pixels, which is
how the tests prove training, scoring and serving see what this says. `crops_to_tensor` turns its
channels-last crops into the model's input layout.
"""

from __future__ import annotations

import numpy as np
import torch

from c3ae_ray.crops import CROP_SIZE, CropConfig, cut_region
from c3ae_ray.images import to_rgb_uint8


def _reflect_coordinate(coord: np.ndarray, n: int) -> np.ndarray:
    """Continuous pixel-centre coordinates mirrored at -0.5 and n - 0.5, then clipped (grid_sample's rule)."""
    distance = np.abs(coord + 0.5)
    flips = np.floor(distance / n)
    extra = distance - flips * n
    mirrored = np.where(flips % 2 == 0, extra - 0.5, n - extra - 0.5)
    return np.clip(mirrored, 0, n - 1)


def _interpolation_matrix(start: float, end: float, size: int, n: int) -> np.ndarray:
    """(size, n) bilinear weights sampling [start, end) at `size` pixel centres of an axis of n pixels."""
    centres = start + (np.arange(size) + 0.5) * (end - start) / size - 0.5
    coord = _reflect_coordinate(centres, n)
    low = np.floor(coord).astype(np.int64)
    high = np.minimum(low + 1, n - 1)
    frac = coord - low
    weights = np.zeros((size, n))
    np.add.at(weights, (np.arange(size), low), 1 - frac)
    np.add.at(weights, (np.arange(size), high), frac)
    return weights


def sample_crops(region: np.ndarray, boxes: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """Each box of `region` -> a size x size crop, bilinear at pixel centres with reflect padding: (B, size, size, 3) uint8."""
    region = to_rgb_uint8(region)
    height, width = region.shape[:2]
    pixels = region.astype(np.float64)
    crops = np.empty((len(boxes), size, size, 3), dtype=np.uint8)
    for i, (bx1, by1, bx2, by2) in enumerate(np.asarray(boxes, dtype=np.float64)):
        along_y = _interpolation_matrix(by1, by2, size, height)
        along_x = _interpolation_matrix(bx1, bx2, size, width)
        values = np.einsum("ih,hwc,jw->ijc", along_y, pixels, along_x, optimize=True)
        crops[i] = np.clip(np.floor(values + 0.5), 0, 255)
    return crops


def face_crops(image: np.ndarray, face_box, cfg: CropConfig = CropConfig(), landmarks=None) -> np.ndarray:
    """Image (H, W[, C]) and a face box (and its landmarks, for aligned crops) -> the model's input:
    (len(scales), size, size, 3) uint8."""
    region, boxes = cut_region(image, face_box, cfg, landmarks)
    return sample_crops(region, boxes)


def crops_to_tensor(crops) -> torch.Tensor:
    """(N, 3, 64, 64, 3) uint8 crops as `sample_crops` cuts them -> (N, 3, 3, 64, 64) for the model."""
    return torch.as_tensor(crops).permute(0, 1, 4, 2, 3)
