"""The crop geometry: the only place it lives. Preprocessing, training, scoring and serving all use it.

Two steps, both here so that no stage can drift from another:

1. `cut_region`: the square around the face that holds the largest context box plus a margin (room for
   the random box shift in training), cut with reflect padding where it leaves the image and resized to
   `region_size` pixels (area filter when shrinking, bilinear when enlarging). The face box's longer side
   becomes `size` pixels there (64 by default), so step 2 never shrinks by more than max(scales).
   Preprocessing stores exactly this region; serving and scoring compute it on the fly.
2. `sample_crops`: each context box is sampled to `size` x `size` with bilinear interpolation at pixel
   centres and reflect padding, which is exactly what `torch.nn.functional.grid_sample(mode="bilinear",
   padding_mode="reflection", align_corners=False)` computes: training's batched augmentation samples the
   same pixels when it is switched off.

Context boxes are squares centred on the face box centre with sides `scales` x the box's longer side
(1.0, 1.5, 2.0 by default: the paper gives no numbers and public ports disagree). Landmarks are not used:
the paper's crops are unaligned, and MTCNN boxes are already centred on the face.

Coordinates are pixel-edge coordinates: pixel (x, y) covers [x, x+1) x [y, y+1), as MTCNN's boxes are.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

from c3ae_ray.images import to_rgb_uint8


@dataclass(frozen=True)
class CropConfig:
    scales: tuple[float, ...] = (1.0, 1.5, 2.0)
    size: int = 64
    margin: float = 0.1  # room on each side of the largest box, as a share of its side

    @property
    def region_size(self) -> int:
        return round(self.size * max(self.scales) * (1 + 2 * self.margin))

    def to_dict(self) -> dict:
        return {**asdict(self), "scales": list(self.scales)}

    @classmethod
    def from_dict(cls, values: dict) -> "CropConfig":
        return cls(scales=tuple(values["scales"]), size=int(values["size"]), margin=float(values["margin"]))


def _check_box(face_box) -> np.ndarray:
    box = np.asarray(face_box, dtype=np.float64).reshape(-1)
    if box.shape != (4,) or not np.all(np.isfinite(box)) or box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"face box must be finite [x1, y1, x2, y2] with x2 > x1 and y2 > y1, got {face_box!r}")
    return box


def context_boxes(face_box, scales=CropConfig.scales) -> np.ndarray:
    """(len(scales), 4) squares [x1, y1, x2, y2] centred on the face box, sides scale x its longer side."""
    x1, y1, x2, y2 = _check_box(face_box)
    cx, cy, side = (x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, y2 - y1)
    half = np.asarray(scales, dtype=np.float64)[:, None] * side / 2
    return np.hstack([cx - half, cy - half, cx + half, cy + half])


def region_bounds(face_box, cfg: CropConfig = CropConfig()) -> tuple[int, int, int]:
    """(x1, y1, side) in whole pixels of the square region around the face, before resizing."""
    x1, y1, x2, y2 = _check_box(face_box)
    side = max(1, round(max(x2 - x1, y2 - y1) * max(cfg.scales) * (1 + 2 * cfg.margin)))
    return round((x1 + x2 - side) / 2), round((y1 + y2 - side) / 2), side


def _reflect_index(index: np.ndarray, n: int) -> np.ndarray:
    """Whole-pixel indices mirrored into [0, n) as in ...cba|abc...xyz|zyx... (any distance out)."""
    period = np.mod(index, 2 * n)
    return np.where(period < n, period, 2 * n - 1 - period)


def cut_region(image: np.ndarray, face_box, cfg: CropConfig = CropConfig()) -> tuple[np.ndarray, np.ndarray]:
    """-> (region (R, R, 3) uint8, context boxes (len(scales), 4) float32 in the region's coordinates)."""
    image = to_rgb_uint8(image)
    x1, y1, side = region_bounds(face_box, cfg)
    height, width = image.shape[:2]
    rows = _reflect_index(np.arange(y1, y1 + side), height)
    cols = _reflect_index(np.arange(x1, x1 + side), width)
    patch = np.take(np.take(image, rows, axis=0), cols, axis=1)
    size = cfg.region_size
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    region = cv2.resize(patch, (size, size), interpolation=interpolation) if side != size else patch
    boxes = (context_boxes(face_box, cfg.scales) - [x1, y1, x1, y1]) * (size / side)
    return np.ascontiguousarray(region), boxes.astype(np.float32)


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


def sample_crops(region: np.ndarray, boxes: np.ndarray, size: int = CropConfig.size) -> np.ndarray:
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


def face_crops(image: np.ndarray, face_box, cfg: CropConfig = CropConfig()) -> np.ndarray:
    """Image (H, W[, C]) and a face box -> the model's input: (len(scales), size, size, 3) uint8."""
    region, boxes = cut_region(image, face_box, cfg)
    return sample_crops(region, boxes, cfg.size)
