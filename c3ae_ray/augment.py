"""Training crops with augmentation, batched on whichever device the data is on.

Preprocessing stores per face the region of `c3ae_ray.crops.cut_region` and its three context boxes; training
cuts the crops here, every epoch anew. Per-sample OpenCV in the data loader would cost CPU time per
sample and per epoch; instead one `grid_sample` call cuts all boxes of a batch with random geometry
(box shift, rotation, flip) on the GPU (or CPU), and colour changes and erasing run on the small
crops. Switched off, it is the inference path's crop sampler: scoring, serving, predict and evaluation cut
their crops with this same function, so they see the pixels training saw (a numpy reference written from
the definition, in the tests, checks it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numba
import numpy as np
import torch
import torch.nn.functional as F

from c3ae_ray.config import check
from c3ae_ray.crops import CROP_SIZE


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation as C3AE reimplementations use it; each transform has its own probability and bound."""

    shift: float = 0.1  # each box's centre moves by up to this share of its side in x and y, always on
    p_rotate: float = 0.5
    max_degrees: float = 10.0  # one angle per face, each box turns about its own centre
    p_flip: float = 0.5  # horizontal, one decision per face
    p_brightness: float = 0.5
    brightness: float = 0.2  # adds U(-b, b) * 255
    p_contrast: float = 0.5
    contrast: float = 0.2  # scales around each crop's mean by U(1 - c, 1 + c)
    p_temperature: float = 0.5
    temperature: float = 0.1  # red *= 1 + t, blue *= 1 - t, t ~ U(-T, T)
    p_erase: float = 0.5  # per crop: one rectangle of uniform noise (torchvision RandomErasing, value="random")
    erase_area: tuple[float, float] = (0.02, 0.2)  # share of the crop
    erase_ratio: tuple[float, float] = (0.3, 3.3)  # height / width, drawn log-uniform

    def __post_init__(self):
        for name, value in vars(self).items():
            if name.startswith("p_"):
                check(0 <= value <= 1, f"augment.{name} is a probability (0 to 1), got {value}")


def jitter_boxes(
    boxes: torch.Tensor, region_size: int, shift: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(..., 4) boxes, each moved by U(-shift, shift) x its side in x and y, independently per box; a move
    stops at the region's border [0, region_size] (a box already beyond it never moves further out)."""
    side = boxes[..., 2:] - boxes[..., :2]
    move = (2 * torch.rand(side.shape, generator=generator, device=boxes.device) - 1) * shift * side
    lowest = (-boxes[..., :2]).clamp(max=0)
    highest = (region_size - boxes[..., 2:]).clamp(min=0)
    move = torch.minimum(torch.maximum(move, lowest), highest)
    return boxes + torch.cat([move, move], dim=-1)


def affine_theta(boxes: torch.Tensor, region_size: int, angles: torch.Tensor | None = None, flips: torch.Tensor | None = None) -> torch.Tensor:
    """(N, S, 4) boxes in region pixels, angles (N,) in degrees, flips (N,) bool -> `affine_grid`'s theta
    (N, S, 2, 3) over the square region (align_corners=False). Each crop turns about its centre by the
    angle (90: torch.rot90 of the unturned crop), then is mirrored left-right if flipped. Without angles and
    flips (the inference crops) the boxes are only scaled and moved: the same theta, in a third of the calls."""
    centre = (boxes[..., :2] + boxes[..., 2:]) / region_size - 1
    half = (boxes[..., 2:] - boxes[..., :2]) / region_size  # half the side, in normalised units
    if angles is None and flips is None:
        zero = torch.zeros_like(centre[..., 0])
        return torch.stack([torch.stack([half[..., 0], zero, centre[..., 0]], dim=-1),
                            torch.stack([zero, half[..., 1], centre[..., 1]], dim=-1)], dim=-2)
    scale_x = half[..., 0] * (1 - 2 * flips.to(half.dtype))[:, None]
    scale_y = half[..., 1]
    radians = torch.deg2rad(angles.to(half.dtype))[:, None]
    cos, sin = radians.cos(), radians.sin()
    row_x = torch.stack([cos * scale_x, -sin * scale_y, centre[..., 0]], dim=-1)
    row_y = torch.stack([sin * scale_x, cos * scale_y, centre[..., 1]], dim=-1)
    return torch.stack([row_x, row_y], dim=-2)


def _sample(regions: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    """One grid_sample for all boxes: their grids lie side by side, (N, size, S * size), over each region."""
    n, s = theta.shape[:2]
    grid = F.affine_grid(theta.flatten(0, 1), [n * s, 3, size, size], align_corners=False)
    grid = grid.view(n, s, size, size, 2).transpose(1, 2).reshape(n, size, s * size, 2)
    pixels = regions.permute(0, 3, 1, 2).float()
    crops = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    crops.clamp_(0, 255)  # float weights can overshoot 255 by a rounding error, as a uint8 crop would be
    return crops.view(n, 3, size, s, size).permute(0, 3, 1, 2, 4).contiguous()


def _colour(crops: torch.Tensor, cfg: AugmentConfig, rand) -> torch.Tensor:
    """Brightness, contrast and colour temperature, one draw per face for its S crops; clamped to 0..255."""
    n = crops.shape[0]

    def per_face(p: float, bound: float) -> torch.Tensor:
        value = torch.where(rand(n) < p, (2 * rand(n) - 1) * bound, 0.0)
        return value.view(n, 1, 1, 1, 1)

    crops = (crops + per_face(cfg.p_brightness, cfg.brightness) * 255).clamp(0, 255)
    mean = crops.mean(dim=(2, 3, 4), keepdim=True)
    factor = 1 + per_face(cfg.p_contrast, cfg.contrast)
    crops = (crops * factor + mean * (1 - factor)).clamp(0, 255)  # factor 1 leaves crops exactly as they were
    t = per_face(cfg.p_temperature, cfg.temperature)
    return (crops * torch.cat([1 + t, torch.ones_like(t), 1 - t], dim=2)).clamp(0, 255)


def _erase(crops: torch.Tensor, cfg: AugmentConfig, rand) -> torch.Tensor:
    """Per crop with probability p_erase: one rectangle of the drawn area and aspect ratio, filled with noise."""
    n, s, _, size, _ = crops.shape
    (area_lo, area_hi), (ratio_lo, ratio_hi) = cfg.erase_area, cfg.erase_ratio
    area = (area_lo + (area_hi - area_lo) * rand(n, s)) * size * size
    ratio = torch.exp(math.log(ratio_lo) + (math.log(ratio_hi) - math.log(ratio_lo)) * rand(n, s))
    height = (area * ratio).sqrt().round().clamp(1, size)
    width = (area / ratio).sqrt().round().clamp(1, size)
    top = ((size - height + 1) * rand(n, s)).floor()
    left = ((size - width + 1) * rand(n, s)).floor()
    pixels = torch.arange(size, device=crops.device)
    rows = (pixels >= top[..., None]) & (pixels < (top + height)[..., None])
    cols = (pixels >= left[..., None]) & (pixels < (left + width)[..., None])
    mask = rows[..., :, None] & cols[..., None, :] & (rand(n, s) < cfg.p_erase)[..., None, None]
    return torch.where(mask[:, :, None], rand(crops.shape) * 255, crops)


def crop_batch(
    regions: torch.Tensor,
    boxes: torch.Tensor,
    augment: AugmentConfig | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """regions (N, R, R, 3) uint8 (channels last, as decoded), boxes (N, S, 4) float in region pixels
    -> crops (N, S, 3, 64, 64) float32 in 0..255, ready for C3AE. augment=None: the crops every stage infers
    on (no rounding; on CPUs `_unturned_crops`). Random numbers come from `generator` (on the inputs' device)."""
    if regions.dim() != 4 or regions.shape[1] != regions.shape[2] or regions.shape[3] != 3:
        raise ValueError(f"regions must be (N, R, R, 3) square RGB regions, got shape {tuple(regions.shape)}")
    if regions.dtype != torch.uint8:
        raise ValueError(f"regions must be uint8, got {regions.dtype}")
    if boxes.dim() != 3 or boxes.shape[0] != regions.shape[0] or boxes.shape[2] != 4:
        raise ValueError(f"boxes must be (N={regions.shape[0]}, S, 4), got shape {tuple(boxes.shape)}")
    n, region_size = regions.shape[:2]
    device = regions.device
    boxes = boxes.to(device=device, dtype=torch.float32)
    rand = partial(torch.rand, generator=generator, device=device)
    angles = flips = None  # no turn, no mirror
    if augment is not None:
        boxes = jitter_boxes(boxes, region_size, augment.shift, generator)
        angles = torch.where(rand(n) < augment.p_rotate, (2 * rand(n) - 1) * augment.max_degrees, 0.0)
        flips = rand(n) < augment.p_flip
    if augment is None and device.type == "cpu":  # the inference crops on CPUs
        return torch.from_numpy(_unturned_crops(regions.numpy(), boxes.numpy(), CROP_SIZE))
    crops = _sample(regions, affine_theta(boxes, region_size, angles, flips), CROP_SIZE)
    if augment is not None:
        crops = _erase(_colour(crops, augment, rand), augment, rand)
    return crops


@numba.njit(cache=True, nogil=True)
def _unturned_crops(regions, boxes, size):
    """`_sample` of boxes that are only scaled and moved (`affine_theta` without angles and flips): the same
    bilinear sampling at pixel centres with reflect padding, as grid_sample computes it in float32 (equal within
    float rounding; tested), without PyTorch. Unturned, each crop pixel's source row depends only on its row
    and its source column only on its column, so both are computed once per box. On a CPU, a face's crops take
    a quarter of `_sample`'s time (PyTorch's operators cost more than the arithmetic on three 64 x 64 crops)."""
    n, boxes_per_face, side = boxes.shape[0], boxes.shape[1], regions.shape[1]
    crops = np.empty((n, boxes_per_face, 3, size, size), np.float32)
    low, weight_high = np.empty((2, size), np.int64), np.empty((2, size), np.float32)
    one, half, length = np.float32(1), np.float32(0.5), np.float32(side)
    for face in range(n):
        for box in range(boxes_per_face):
            for axis in range(2):  # x, then y
                start, end = boxes[face, box, axis], boxes[face, box, axis + 2]
                centre, scale = (start + end) / length - one, (end - start) / length
                for k in range(size):
                    grid = scale * (np.float32(2 * k + 1) / np.float32(size) - one) + centre  # affine_grid's
                    distance = abs(((grid + one) * length - one) / np.float32(2) + half)  # in pixels, from -0.5
                    flips = np.floor(distance / length)
                    extra = distance - flips * length
                    source = min(max(extra - half if flips % 2 == 0 else length - extra - half, np.float32(0)), length - one)
                    low[axis, k] = int(np.floor(source))
                    weight_high[axis, k] = source - np.float32(low[axis, k])
            for channel in range(3):
                for i in range(size):
                    y0, wy1 = low[1, i], weight_high[1, i]
                    y1, wy0 = min(y0 + 1, side - 1), one - wy1
                    for j in range(size):
                        x0, wx1 = low[0, j], weight_high[0, j]
                        x1, wx0 = min(x0 + 1, side - 1), one - wx1
                        value = (regions[face, y0, x0, channel] * (wx0 * wy0) + regions[face, y0, x1, channel] * (wx1 * wy0)
                                 + regions[face, y1, x0, channel] * (wx0 * wy1) + regions[face, y1, x1, channel] * (wx1 * wy1))
                        crops[face, box, channel, i, j] = min(max(value, np.float32(0)), np.float32(255))
    return crops
