"""MTCNN (facenet-pytorch) as every stage uses it: batches of RGB images in, faces in original coordinates out.

Two things make it fit for a pipeline:
- Batches of mixed sizes: MTCNN's batched `detect` needs equal-size images, so images are grouped by size
  and each group runs as one batch; images over `max_side` are first shrunk for detection (big photos are
  slow and gain nothing), and their boxes and landmarks are scaled back to the original pixels.
- Speed: on CPUs the three networks run in ONNX Runtime (`onnx_cpu`; the same answers within float
  rounding; with their PReLUs split, 2 to 2.5 times faster than there with ONNX's PRelu). The image
  pyramid and R-Net's and O-Net's inputs (all candidate boxes at once) are resampled from one summed-area
  table per batch (`_detect_batch`), not level by level and box by box with `interpolate` as facenet-pytorch
  does; bit for bit the same values. P-Net's answers on all levels are read and NMS'd in one pass each, and
  everything between the networks is numpy (on GPUs only the networks run there), its loops (resampling and
  NMS) compiled by numba: in numpy's whole-array steps they took a fifth of a 200 x 200 photo's time.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numba
import numpy as np

from c3ae_ray.config import check, resolve_device

if TYPE_CHECKING:  # torch is imported where a detector is built, not with this module
    from c3ae_ray.mtcnn import Mtcnn


@dataclass(frozen=True)
class DetectorConfig:
    """What counts as a face, the same in every stage."""

    min_face_score: float = 0.9  # MTCNN's probability for a detection to count as a face
    # The smallest face looked for, in pixels of the image as detected. A face under 32 px tells the age model
    # little (its box is sampled up to 64 px), and MTCNN's pyramid starts at 12 / min_face_size of the image:
    # 32 instead of facenet-pytorch's 20 does about a third of P-Net's work, for the same age error and faces
    # found (benchmarks/min_face_size.py). Set 20 to find smaller faces in crowds.
    min_face_size: int = 32
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)  # facenet-pytorch's defaults
    factor: float = 0.709
    max_side: int = 1280  # longer side above this is shrunk for detection only

    def __post_init__(self):
        check(0 <= self.min_face_score <= 1, f"min_face_score is a probability (0 to 1), got {self.min_face_score}")
        check(self.min_face_size >= 1 and self.max_side >= 12, "detector: min_face_size and max_side must be positive")
        check(0 < self.factor < 1, f"detector: factor must be between 0 and 1, got {self.factor}")


@dataclass
class Faces:
    """Faces of one image, most confident first, in the original image's pixel coordinates."""

    boxes: np.ndarray  # (n, 4) float32 [x1, y1, x2, y2]
    scores: np.ndarray  # (n,) float32
    landmarks: np.ndarray  # (n, 5, 2) float32: eyes, nose, mouth corners

    def __len__(self) -> int:
        return len(self.scores)

    def above(self, min_score: float) -> "Faces":
        keep = self.scores >= min_score
        return Faces(self.boxes[keep], self.scores[keep], self.landmarks[keep])


def detection_scale(height: int, width: int, max_side: int) -> tuple[int, int]:
    """The (height, width) an image is detected at: itself, or shrunk so its longer side is max_side."""
    longer = max(height, width)
    if longer <= max_side:
        return height, width
    return max(1, round(height * max_side / longer)), max(1, round(width * max_side / longer))


@dataclass(frozen=True)
class Networks:
    """P-Net, R-Net and O-Net as `_detect_batch` calls them: a float32 batch (numpy) in, a tuple of arrays out."""

    pnet: Callable
    rnet: Callable
    onet: Callable

    @classmethod
    def of(cls, mtcnn: Mtcnn, device: str) -> "Networks":
        """On CPUs facenet-pytorch's weights in ONNX Runtime (`onnx_cpu`); elsewhere `pytorch`."""
        if device != "cpu":
            return cls.pytorch(mtcnn, device)
        import torch

        from c3ae_ray.onnx_cpu import OnnxCpu

        return cls(OnnxCpu(mtcnn.pnet, torch.zeros(1, 3, 24, 24), {0: "images", 2: "height", 3: "width"}).run,
                   OnnxCpu(mtcnn.rnet, torch.zeros(2, 3, 24, 24), {0: "boxes"}).run,
                   OnnxCpu(mtcnn.onet, torch.zeros(2, 3, 48, 48), {0: "boxes"}).run)

    @classmethod
    def pytorch(cls, mtcnn: Mtcnn, device: str) -> "Networks":
        """The PyTorch modules (`c3ae_ray.mtcnn`) on `device`: only the networks run there, their inputs and answers are
        copied from and to the host."""
        return cls(*(functools.partial(_on_device, module, device) for module in (mtcnn.pnet, mtcnn.rnet, mtcnn.onet)))


def _on_device(module, device: str, batch: np.ndarray) -> tuple[np.ndarray, ...]:
    """A PyTorch network on `device`, fed and read as numpy on the host."""
    import torch

    with torch.no_grad():
        return tuple(output.cpu().numpy() for output in module(torch.from_numpy(np.ascontiguousarray(batch)).to(device)))


class FaceDetector:
    def __init__(self, device: str = "auto", cfg: DetectorConfig = DetectorConfig()):
        from c3ae_ray.mtcnn import Mtcnn

        self.cfg = cfg
        self.device = resolve_device(device)
        self.mtcnn = Mtcnn.pretrained(self.device)
        self.networks = Networks.of(self.mtcnn, self.device)

    def detect_each(self, images: list[np.ndarray]) -> list["Faces | Exception"]:
        """`detect`, but when a batch fails it goes image by image: one bad image cannot sink the others."""
        try:
            return self.detect(images)
        except Exception:
            results: list[Faces | Exception] = []
            for image in images:
                try:
                    results.append(self.detect([image])[0])
                except Exception as error:
                    results.append(error)
            return results

    def detect(self, images: list[np.ndarray]) -> list[Faces]:
        """RGB uint8 images of any sizes -> one Faces per image, in the same order: those over min_face_score."""
        results: list[Faces | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, image in enumerate(images):
            groups[detection_scale(*image.shape[:2], self.cfg.max_side)].append(index)
        for (height, width), indices in groups.items():
            # MTCNN's first pyramid level is min_face_size px (min side x 12 / min_face_size); under P-Net's
            # 12 px window nothing can be found, and facenet-pytorch fails on an empty pyramid
            if min(height, width) * (12.0 / self.cfg.min_face_size) < 12:
                for index in indices:
                    results[index] = _no_faces()
                continue
            batch = np.stack([_resized(images[i], height, width) for i in indices])
            for index, (box, score, point) in zip(indices, _detect_batch(self.cfg, self.networks, batch)):
                original_height, original_width = images[index].shape[:2]
                scale = np.array([original_width / width, original_height / height], np.float32)
                results[index] = _faces(box, score, point, scale).above(self.cfg.min_face_score)
        return results


def _resized(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


def _no_faces() -> Faces:
    return Faces(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32))


def _faces(boxes, scores, points, scale: np.ndarray) -> Faces:
    """One image's MTCNN output -> Faces scaled back by (sx, sy), best score first."""
    scores = np.asarray(scores, np.float32)
    order = np.argsort(-scores, kind="stable")
    boxes = np.asarray(boxes, np.float32)[order] * np.tile(scale, 2)
    points = np.asarray(points, np.float32)[order] * scale
    return Faces(boxes, scores[order], points)


def _detect_batch(cfg: DetectorConfig, networks: Networks, batch: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """facenet-pytorch's `detect_face` and `MTCNN.detect` (keep_all, select_largest=False; its settings from
    `cfg`, its networks from `networks`) with the same results, bit for bit, but faster:
    - the pyramid's levels (`whole_images_resampled`) and R-Net's and O-Net's inputs for all candidate boxes at
      once (`_box_crops`) come from a summed-area table: facenet's `interpolate` call per box was over a quarter
      of detection time on 200 x 200 images, its pyramid a quarter on 448 x 448 ones;
    - P-Net's answers on all levels are read and NMS'd in one pass each;
    - everything between the networks is numpy, its loops compiled (`_area_means`, `_greedy`): on one photo's few
      boxes PyTorch's per-operator overhead made that glue cost more than R-Net and O-Net together.

    batch: (n, height, width, 3) uint8 RGB -> per image (boxes (k, 4), scores (k,), landmarks (k, 5, 2)) float32.
    """
    height, width = batch.shape[1:3]
    scale = 12.0 / cfg.min_face_size
    smallest_side = min(height, width) * scale
    scales = []
    while smallest_side >= 12:
        scales.append(scale)
        scale, smallest_side = scale * cfg.factor, smallest_side * cfg.factor

    # P-Net on the image pyramid, each level resampled from the summed-area table (facenet's `imresample`, bit
    # for bit). Its answers on all levels are read as one list of cells (`_pnet_cells`; facenet's
    # `generateBoundingBox` on every level at once), then NMS within each level and image (one call: each
    # (level, image) pair is its own group), then within each image
    table = _summed_area_table(batch)
    levels = [networks.pnet(whole_images_resampled(table, (int(height * scale + 1), int(width * scale + 1)), normalised=True))
              for scale in scales]
    columns, rows, cell_scales, cell_levels = _pnet_cells(tuple((*probs.shape[2:], scale) for (_, probs), scale in zip(levels, scales)))
    probs = np.concatenate([probs[:, 1].reshape(len(batch), -1) for _, probs in levels], 1)  # (n, cells)
    reg = np.concatenate([reg.reshape(len(batch), 4, -1) for reg, _ in levels], 2)  # (n, 4, cells)
    image_inds, cells = np.nonzero(probs >= cfg.thresholds[0])
    corners = np.stack([columns[cells], rows[cells]], 1) * 2  # P-Net's stride
    cell_scale = cell_scales[cells, None]
    boxes = np.concatenate([np.floor((corners + 1) / cell_scale), np.floor((corners + 12) / cell_scale),  # its 12 px window
                            probs[image_inds, cells, None], reg[image_inds, :, cells]], 1)
    pick = _nms(boxes, cell_levels[cells] * len(batch) + image_inds, 0.5)
    boxes, image_inds = boxes[pick], image_inds[pick]
    pick = _nms(boxes, image_inds, 0.7)
    boxes, image_inds = boxes[pick], image_inds[pick]
    box_width, box_height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    corners = [boxes[:, 0] + boxes[:, 5] * box_width, boxes[:, 1] + boxes[:, 6] * box_height,
               boxes[:, 2] + boxes[:, 7] * box_width, boxes[:, 3] + boxes[:, 8] * box_height]
    boxes = _squared(np.stack([*corners, boxes[:, 4]], 1))

    # R-Net refines the candidates
    boxes, image_inds, crops = _box_crops(table, boxes, image_inds, 24)
    if len(boxes) > 0:
        reg, probs = _in_chunks(networks.rnet, crops)
        passed = probs[:, 1] > cfg.thresholds[1]
        boxes = np.concatenate((boxes[passed, :4], probs[passed, 1:2]), 1)
        image_inds, reg = image_inds[passed], reg[passed]
        pick = _nms(boxes, image_inds, 0.7)
        boxes, image_inds = _squared(_regressed(boxes[pick], reg[pick])), image_inds[pick]

    # O-Net scores the faces and places the landmarks
    points = np.zeros((0, 5, 2), np.float32)
    boxes, image_inds, crops = _box_crops(table, boxes, image_inds, 48)
    if len(boxes) > 0:
        reg, points, probs = _in_chunks(networks.onet, crops)
        passed = probs[:, 1] > cfg.thresholds[2]
        boxes = np.concatenate((boxes[passed, :4], probs[passed, 1:2]), 1)
        image_inds, reg, points = image_inds[passed], reg[passed], points[passed]
        box_width, box_height = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
        points_x = box_width[:, None] * points[:, :5] + boxes[:, 0:1] - 1
        points_y = box_height[:, None] * points[:, 5:] + boxes[:, 1:2] - 1
        points = np.stack((points_x, points_y), 2)
        boxes = _regressed(boxes, reg)
        pick = _nms_min(boxes, image_inds, 0.7)
        boxes, image_inds, points = boxes[pick], image_inds[pick], points[pick]

    return [(boxes[image_inds == i, :4], boxes[image_inds == i, 4], points[image_inds == i]) for i in range(len(batch))]


def _in_chunks(network: Callable, crops: np.ndarray, chunk: int = 512) -> tuple[np.ndarray, ...]:
    """`network` over the crops in chunks of at most `chunk` (facenet's `fixed_batch_process`: bounded memory)."""
    parts = [network(crops[start:start + chunk]) for start in range(0, len(crops), chunk)]
    return tuple(np.concatenate(outputs) for outputs in zip(*parts))


def _nms(boxes: np.ndarray, groups: np.ndarray, threshold: float) -> np.ndarray:
    """torchvision's `batched_nms` (what facenet-pytorch calls) on boxes [x1, y1, x2, y2, score, ...], with the
    same float32 arithmetic: the indices kept, best score first. Greedy within each group, best first (`_greedy`).
    Up to 1,000 boxes torchvision shifts each group past the last (its coordinate trick), which rounds the
    coordinates: so do we. (Unlike it, boxes with negative coordinates can never reach into another group.)"""
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    corners = _groups_apart(boxes[:, :4], groups) if len(boxes) <= 1000 else boxes[:, :4]
    order = np.lexsort((-boxes[:, 4], groups))  # by group, best score first (stable: ties keep their order)
    edges = np.concatenate([[0], np.flatnonzero(np.diff(groups[order])) + 1, [len(order)]])
    kept = np.flatnonzero(_greedy(np.ascontiguousarray(corners, np.float32), order, edges, float(threshold)))
    return kept[np.argsort(-boxes[kept, 4], kind="stable")]  # torchvision's order: best score first, ties by position


@numba.njit(cache=True, nogil=True)
def _greedy(corners, order, edges, threshold):
    """torchvision's CPU NMS kernel over each group (`order[edges[g]:edges[g + 1]]`, best first): whether each
    box is kept. A box is dropped when its IoU with a kept one of its group exceeds `threshold` (in float32,
    compared in float64, as there)."""
    x1, y1, x2, y2 = corners[:, 0], corners[:, 1], corners[:, 2], corners[:, 3]
    areas = (x2 - x1) * (y2 - y1)
    kept, dropped = np.zeros(len(corners), np.bool_), np.zeros(len(corners), np.bool_)
    zero = np.float32(0)
    for group in range(len(edges) - 1):
        for first in range(edges[group], edges[group + 1]):
            i = order[first]
            if dropped[i]:
                continue
            kept[i] = True
            for later in range(first + 1, edges[group + 1]):
                j = order[later]
                if dropped[j]:
                    continue
                overlap = (max(zero, min(x2[i], x2[j]) - max(x1[i], x1[j]))
                           * max(zero, min(y2[i], y2[j]) - max(y1[i], y1[j])))
                if overlap / (areas[i] + areas[j] - overlap) > threshold:
                    dropped[j] = True
    return kept


def _nms_min(boxes: np.ndarray, groups: np.ndarray, threshold: float) -> np.ndarray:
    """facenet-pytorch's `batched_nms_numpy` with its "Min" overlap (intersection over the smaller box), O-Net's:
    its `nms_numpy`'s arithmetic and order, here so that detection never imports facenet_pytorch (`c3ae_ray.mtcnn`
    says why)."""
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    x1, y1, x2, y2 = _groups_apart(boxes[:, :4], groups).T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(boxes[:, 4])  # ascending: the best is last
    kept = []
    while order.size > 0:
        best, rest = order[-1], order[:-1]
        kept.append(best)
        width = np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]) + 1)
        height = np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]) + 1)
        order = rest[width * height / np.minimum(areas[best], areas[rest]) <= threshold]
    return np.array(kept, np.int64)


def _groups_apart(corners: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Box corners shifted by group x (the largest coordinate + 1), in float32 as torchvision and facenet-pytorch
    shift them: boxes (with non-negative corners) of different groups never overlap."""
    return corners + (groups.astype(np.float32) * (corners.max() + np.float32(1)))[:, None]


def _regressed(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    """facenet-pytorch's `bbreg`: boxes moved by the network's offsets (shares of the box's sides), in place."""
    box_width, box_height = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
    boxes[:, :4] = np.stack([boxes[:, 0] + reg[:, 0] * box_width, boxes[:, 1] + reg[:, 1] * box_height,
                             boxes[:, 2] + reg[:, 2] * box_width, boxes[:, 3] + reg[:, 3] * box_height], 1)
    return boxes


def _squared(boxes: np.ndarray) -> np.ndarray:
    """facenet-pytorch's `rerec`: each box made a square of its longer side about its centre, in place."""
    box_height, box_width = boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]
    side = np.maximum(box_width, box_height)
    boxes[:, 0] = boxes[:, 0] + box_width * 0.5 - side * 0.5
    boxes[:, 1] = boxes[:, 1] + box_height * 0.5 - side * 0.5
    boxes[:, 2:4] = boxes[:, :2] + side[:, None]
    return boxes


@functools.lru_cache(maxsize=8)
def _pnet_cells(shapes: tuple[tuple[int, int, float], ...]):
    """P-Net's output cells on every pyramid level ((rows, columns, scale) each), in the order of its flattened
    answers concatenated: each cell's column, row, level's scale (float32, as facenet divides by it) and level
    index. The same for every image of a size, so the last few sizes' are kept (a 1280 px photo's take 2.5 MB)."""
    columns, rows, scales, levels = [], [], [], []
    for level, (height, width, scale) in enumerate(shapes):
        row, column = np.divmod(np.arange(height * width), width)
        columns.append(column)
        rows.append(row)
        scales.append(np.full(height * width, scale))
        levels.append(np.full(height * width, level))
    return tuple(np.concatenate(parts).astype(dtype) for parts, dtype in
                 ((columns, np.float32), (rows, np.float32), (scales, np.float32), (levels, np.int64)))


def _summed_area_table(batch: np.ndarray) -> np.ndarray:
    """(n, height + 1, width + 1, 3): [k, r, c] is the sum of image k's pixels above row r and left of column c,
    so any rectangle's sum is 4 lookups. Exact integers: int32 (half the memory traffic of float64, which the
    lookups are bound by) unless an image's total could overflow it."""
    depth = cv2.CV_32S if 255 * batch.shape[1] * batch.shape[2] < 2**31 else cv2.CV_64F
    return np.stack([cv2.integral(image, sdepth=depth) for image in batch])


def _box_crops(table: np.ndarray, boxes: np.ndarray, image_inds: np.ndarray, size: int):
    """The boxes facenet can crop, their image indices, and their crops resampled to size x size and scaled as
    the nets expect. Boxes are cut as facenet cuts them (its `pad`); one wholly outside its image has no crop,
    and facenet skips it."""
    height, width = table.shape[1] - 1, table.shape[2] - 1
    edges = np.trunc(boxes[:, :4]).astype(np.int64)  # facenet's `pad`
    x, y = np.maximum(edges[:, 0], 1), np.maximum(edges[:, 1], 1)
    ex, ey = np.minimum(edges[:, 2], width), np.minimum(edges[:, 3], height)
    inside = (ey > y - 1) & (ex > x - 1)
    crops = area_resampled(table, image_inds[inside], y[inside] - 1, ey[inside], x[inside] - 1, ex[inside], size, normalised=True)
    return boxes[inside], image_inds[inside], crops


def area_resampled(table: np.ndarray, image_inds, top, bottom, left, right, size: int, normalised: bool = False) -> np.ndarray:
    """Crops [top:bottom, left:right] of the images whose `_summed_area_table` is `table`, each resampled to
    (channels, size, size) float32 exactly as `interpolate(crop, mode="area")` (`_area_means`), all crops at
    once; `normalised`: scaled as MTCNN's networks take them ((x - 127.5) / 128, in float32 as facenet-pytorch
    scales them)."""
    return _area_means(table, *(np.asarray(v, np.int64) for v in (image_inds, top, bottom, left, right)), size, size, normalised)


def whole_images_resampled(table: np.ndarray, size: tuple[int, int], normalised: bool = False) -> np.ndarray:
    """The images whose `_summed_area_table` is `table`, resampled to (channels, height, width) exactly as
    `interpolate(images, size, mode="area")` (one pyramid level); `normalised` as in `area_resampled`."""
    n, height, width = len(table), table.shape[1] - 1, table.shape[2] - 1
    zeros = np.zeros(n, np.int64)
    return _area_means(table, np.arange(n), zeros, np.full(n, height), zeros, np.full(n, width), *size, normalised)


@numba.njit(cache=True, nogil=True)
def _area_means(table, image_inds, top, bottom, left, right, height, width, normalised):
    """Area resampling of rectangles, each to (channels, height, width) float32: adaptive average pooling,
    where output cell i of n over L pixels averages pixels floor(i * L / n) .. ceil((i + 1) * L / n) - 1. Each
    cell's sum is exact from the summed-area table; it is divided in float32 by the cell's height, then its
    width, as PyTorch's pooling does, so results agree to the bit."""
    channels = table.shape[3]
    means = np.empty((len(top), channels, height, width), np.float32)
    col_from, col_to, cell_width = np.empty(width, np.int64), np.empty(width, np.int64), np.empty(width, np.float32)
    for box in range(len(top)):
        image = table[image_inds[box]]
        rows, cols = bottom[box] - top[box], right[box] - left[box]
        for j in range(width):
            col_from[j] = left[box] + j * cols // width
            col_to[j] = left[box] + ((j + 1) * cols + width - 1) // width
            cell_width[j] = col_to[j] - col_from[j]
        for i in range(height):
            row_from = top[box] + i * rows // height
            row_to = top[box] + ((i + 1) * rows + height - 1) // height
            cell_height = np.float32(row_to - row_from)
            for j in range(width):
                for channel in range(channels):
                    total = (image[row_to, col_to[j], channel] - image[row_from, col_to[j], channel]
                             - image[row_to, col_from[j], channel] + image[row_from, col_from[j], channel])
                    mean = np.float32(total) / cell_height / cell_width[j]
                    means[box, channel, i, j] = (mean - np.float32(127.5)) * np.float32(0.0078125) if normalised else mean
    return means
