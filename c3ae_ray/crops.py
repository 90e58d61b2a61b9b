"""The crop geometry: the only place it lives. Preprocessing, training, scoring and serving all use it.

Two steps, so that no stage can drift from another:

1. `cut_region`: the square around the face that holds the largest context box plus a margin (room for
   the random box shift in training), cut with reflect padding where it leaves the image and resized to
   `region_size` pixels (area filter when shrinking, bilinear when enlarging). The face box's longer side
   becomes 64 pixels there, so step 2 never shrinks by more than max(scales).
   Preprocessing stores exactly this region; serving and scoring compute it on the fly.
2. `augment.crop_batch`: each context box is sampled to 64 x 64 with bilinear interpolation at pixel centres
   and reflect padding (`grid_sample`), for a batch at once, with training's random geometry or without it.

Context boxes are squares centred on the face box centre with sides `scales` x the box's longer side
(1.0, 1.5, 2.0 by default: the paper gives no numbers and public ports disagree). By default landmarks are
not used: the paper's crops are unaligned, and MTCNN boxes are already centred on the face. With `align`
(the seeds' MTCNN alignment) the region is rotated about the face box centre so that the eyes (MTCNN's
first two landmarks) are level before anything is cut; the context boxes stay where they are in the region.

The crop side is the network's input (64: its trunk ends in a 4x4 map), so it is fixed, and so is the number
of scales (three, one per context); the scales' values and the margin are settings, stored with the data
and in the model file so every stage cuts as training did.

Coordinates are pixel-edge coordinates: pixel (x, y) covers [x, x+1) x [y, y+1), as MTCNN's boxes are.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numba
import numpy as np

from c3ae_ray.config import check
from c3ae_ray.images import to_rgb_uint8

CROP_SIZE = 64  # the network's input side
N_SCALES = 3  # the network's contexts


@dataclass(frozen=True)
class CropConfig:
    scales: tuple[float, ...] = (1.0, 1.5, 2.0)  # context box sides as multiples of the face box's longer side
    size: int = CROP_SIZE  # recorded in every file for its readers; any other value is refused
    margin: float = 0.1  # room on each side of the largest box, as a share of its side
    align: bool = False  # rotate each region so the eyes are level (needs the face's landmarks)

    def __post_init__(self):
        check(self.size == CROP_SIZE, f"crop size is fixed at {CROP_SIZE} (the network's input), got {self.size}")
        check(
            len(self.scales) == N_SCALES and all(a < b for a, b in zip((0, *self.scales), self.scales)),
            f"crop scales must be {N_SCALES} increasing positive numbers, got {list(self.scales)}",
        )
        check(0 <= self.margin <= 1, f"crop margin must be between 0 and 1, got {self.margin}")

    @property
    def region_size(self) -> int:
        return round(CROP_SIZE * max(self.scales) * (1 + 2 * self.margin))


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


def reflected_square(image: np.ndarray, x1: int, y1: int, side: int) -> np.ndarray:
    """image[y1:y1 + side, x1:x1 + side] with reflect padding (`_reflect_index`) where it leaves the image.

    Only the part of the image the square's pixels come from is padded, with OpenCV's BORDER_REFLECT (the same
    mirroring): about 9x faster than gathering every pixel's mirrored index when a face fills its photo and
    the square is mostly padding. The part reaches every image edge the square is mirrored about, so its
    padding is the image's."""
    (top, bottom), (left, right) = _source_range(y1, side, image.shape[0]), _source_range(x1, side, image.shape[1])
    part = image[top:bottom + 1, left:right + 1]
    y, x = y1 - top, x1 - left  # the square's corner in the part
    pads = (max(0, -y), max(0, y + side - part.shape[0]), max(0, -x), max(0, x + side - part.shape[1]))
    if any(pads):
        part = cv2.copyMakeBorder(part, *pads, cv2.BORDER_REFLECT)
    return part[y + pads[0]:y + pads[0] + side, x + pads[2]:x + pads[2] + side]


def shrunk_square(image: np.ndarray, x1: int, y1: int, side: int, size: int) -> np.ndarray:
    """`reflected_square(image, x1, y1, side)` shrunk to size x size with the area filter, as
    `cv2.resize(..., interpolation=cv2.INTER_AREA)` shrinks it (each output pixel the mean of the square's
    pixels under it, fractions of pixels at its edges), within one level of rounding (tested).

    Computed from the image's summed-area table, without building the square: for a face that fills its photo
    the square is about 9 times the photo, mostly mirrored padding, and shrinking it took 4.6 ms at 448 x 448
    (now 0.5 ms). Any rectangle's mean, fractional edges included, is a few lookups into the table (bilinear
    between whole pixels), and so is its mirrored copy, whose sums repeat the image's with period twice the
    side (`_cell_means`)."""
    height, width, _ = image.shape
    # exact integers: int32 (a quarter of float64's time to build) unless an image's total could overflow it
    depth = cv2.CV_32S if 255 * height * width < 2**31 else cv2.CV_64F
    table = cv2.integral(image, sdepth=depth)  # (height + 1, width + 1, channels)
    return _weighted_means(*_cell_means(y1, side, size, height), *_cell_means(x1, side, size, width), table)


@numba.njit(cache=True, nogil=True)
def _weighted_means(row_columns, row_weights, col_columns, col_weights, table):
    """The region from `_cell_means`' weights of each axis on the summed-area table, one output row at a time:
    the weighted sum of five table rows, then each pixel a weighted sum of five of its columns; in float64,
    entries in their order. Only one row is held (a whole intermediate was megabytes per face, whose pages
    the allocator handed back and faulted in again on every call). Halves round up, whatever the float error
    of the sums (far below 1e-6): the same square, mirrored or not, gives the same pixels."""
    n_rows, entries = row_columns.shape
    n_cols, width, channels = col_columns.shape[0], table.shape[1], table.shape[2]
    flat = table.reshape(table.shape[0], width * channels)
    row = np.empty(width * channels)
    region = np.empty((n_rows, n_cols, channels), np.uint8)
    for i in range(n_rows):
        row[:] = 0.0
        for k in range(entries):
            weight, source = row_weights[i, k], flat[row_columns[i, k]]
            for x in range(width * channels):
                row[x] += weight * source[x]
        for j in range(n_cols):
            for channel in range(channels):
                mean = 0.0
                for k in range(entries):
                    mean += col_weights[j, k] * row[col_columns[j, k] * channels + channel]
                region[i, j, channel] = min(max(np.floor(mean + (0.5 + 1e-6)), 0.0), 255.0)
    return region


def _cell_means(start: int, side: int, size: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The map from an axis's cumulative sums (entry t: the sum of its first t pixels) to the means of the
    mirrored axis (`_reflect_index`) over `size` equal cells of [start, start + side), as five (entry, weight)
    pairs per cell: (size, 5) entries and (size, 5) weights.

    The mirrored axis's sum up to a whole position z = 2n * periods + q is 2 * periods * total + cum(q) where
    q <= n, else (2 * periods + 2) * total - cum(2n - q); up to a fractional position, the line between the two
    whole positions around it. A cell's mean is the difference at its two ends over its width: the axis's
    total (entry n) once, and the four whole positions."""
    width = side / size
    offsets = np.arange(size + 1) * width  # the cell edges from `start`: the same weights wherever the square is
    whole = start + np.floor(offsets).astype(np.int64)
    fraction = offsets - np.floor(offsets)
    points = np.stack([whole[1:], whole[1:] + 1, whole[:-1], whole[:-1] + 1], axis=1)  # (size, 4)
    weights = np.stack([1 - fraction[1:], fraction[1:], fraction[:-1] - 1, -fraction[:-1]], axis=1) / width
    periods, q = np.divmod(points, 2 * n)
    mirrored = q > n
    columns = np.concatenate([np.full((size, 1), n), np.where(mirrored, 2 * n - q, q)], axis=1)
    values = np.concatenate([(weights * (2 * periods + 2 * mirrored)).sum(axis=1, keepdims=True), weights * np.where(mirrored, -1.0, 1.0)], axis=1)
    return columns, values


def _source_range(start: int, side: int, n: int) -> tuple[int, int]:
    """First and last pixel of an axis of n pixels that [start, start + side) reads, widened to the axis's first
    pixel when an index is mirrored about it, and to its last when one is mirrored about that."""
    used = _reflect_index(np.arange(start, start + side), n)
    first = 0 if start < 0 or start + side > 2 * n else int(used.min())
    last = n - 1 if start + side > n or start < -n else int(used.max())
    return first, last


def eye_angle(landmarks) -> float:
    """Degrees the line from the left eye to the right eye (MTCNN's first two points) is turned from level;
    positive when the right eye is lower (clockwise on screen)."""
    points = np.asarray([] if landmarks is None else landmarks, dtype=np.float64).reshape(-1, 2)
    if points.shape[0] < 2 or not np.all(np.isfinite(points[:2])):
        raise ValueError(f"aligned crops need the face's landmarks (eyes first), got {landmarks!r}")
    (lx, ly), (rx, ry) = points[:2]
    return float(np.degrees(np.arctan2(ry - ly, rx - lx)))


def cut_region(image: np.ndarray, face_box, cfg: CropConfig = CropConfig(), landmarks=None) -> tuple[np.ndarray, np.ndarray]:
    """-> (region (R, R, 3) uint8, context boxes (len(scales), 4) float32 in the region's coordinates).
    `landmarks` (5 MTCNN points) are needed, and only used, when `cfg.align` is on."""
    image = to_rgb_uint8(image)
    if cfg.align:
        return _aligned_region(image, face_box, eye_angle(landmarks), cfg)
    x1, y1, side = region_bounds(face_box, cfg)
    size = cfg.region_size
    if side > size:
        region = shrunk_square(image, x1, y1, side, size)
    else:
        region = cv2.resize(reflected_square(image, x1, y1, side), (size, size), interpolation=cv2.INTER_LINEAR)
    boxes = (context_boxes(face_box, cfg.scales) - [x1, y1, x1, y1]) * (size / side)
    return np.ascontiguousarray(region), boxes.astype(np.float32)


def _aligned_region(image: np.ndarray, face_box, angle: float, cfg: CropConfig) -> tuple[np.ndarray, np.ndarray]:
    """The region of `cut_region`, centred on the face box, turned by -angle so the eyes are level: a square
    patch that holds the turned region is cut (reflect padding, as unaligned), shrunk with the area filter
    where the region shrinks, then rotated and cut to R x R with bilinear interpolation."""
    x1, y1, x2, y2 = _check_box(face_box)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    side = max(x2 - x1, y2 - y1) * max(cfg.scales) * (1 + 2 * cfg.margin)
    size = cfg.region_size
    outer = int(np.ceil(side * np.sqrt(2))) + 2  # holds the region at any angle
    px1, py1 = int(np.floor(cx - outer / 2)), int(np.floor(cy - outer / 2))
    scale = min(1.0, size / side)  # shrink first with the area filter; the rotation then resamples at most 1:1
    if scale < 1:
        shrunk = max(1, round(outer * scale))
        patch = shrunk_square(image, px1, py1, outer, shrunk)
        scale = shrunk / outer
    else:
        patch = reflected_square(image, px1, py1, outer)
    centre = ((cx - px1) * scale, (cy - py1) * scale)  # the box centre in the patch
    # patch -> region: rotate by `angle` about the box centre (levelling the eyes), scale to R / side, centre at R / 2
    matrix = cv2.getRotationMatrix2D(centre, angle, size / (side * scale))
    matrix[:, 2] += (size / 2 - centre[0], size / 2 - centre[1])
    region = cv2.warpAffine(patch, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    boxes = (context_boxes(face_box, cfg.scales) - [cx - side / 2, cy - side / 2] * 2) * (size / side)
    return np.ascontiguousarray(region), boxes.astype(np.float32)
