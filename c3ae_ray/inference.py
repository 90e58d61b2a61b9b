"""The one inference path: encoded images -> faces -> crops -> model outputs, with typed results. No Ray.

Every stage calls it: the scoring actor, `c3ae predict` and Serve's worker on CPUs run both halves in one
process (`Estimator`); on GPUs two Serve deployments run one half each (`FaceFinder`, then `AgeModel`) and
join them with `attach`;
preprocessing runs the detector half alone and stores its regions; evaluation and the model card run the
model half on stored regions (`predict_regions`, `predict_stored`). The geometry is `crops.cut_region` then
`augment.crop_batch` without augmentation, exactly as training cuts its crops, so nothing can skew.

Per image the answer is either `ImageFaces` (the faces with their outputs) or `ImageFailure` (a short code
and a message); a new model output (a head) is a field of `Outputs` and `Face`, and nothing else here changes.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from c3ae_ray.augment import crop_batch
from c3ae_ray.calibrate import age_range_of, bounds
from c3ae_ray.config import resolve_device
from c3ae_ray.crops import CROP_SIZE, N_SCALES, CropConfig, cut_region
from c3ae_ray.detect import DetectorConfig, FaceDetector, Faces
from c3ae_ray.images import DEFAULT_MAX_PIXELS, ImageError, decode_image
from c3ae_ray.model import C3AE, for_inference, load_model, model_crop, model_identity


@dataclass(frozen=True)
class ImageFailure:
    """An image that gave no answer: `code` is short and stable (error rows, counts, HTTP statuses)."""

    code: str  # empty, too_large, undecodable, read_error (decoding); inference_error (detector or crops)
    message: str

    @property
    def reason(self) -> str:
        return f"{self.code}: {self.message}"

    @classmethod
    def of(cls, error: Exception) -> "ImageFailure":
        if isinstance(error, ImageError):
            return cls(error.reason, str(error))
        return cls("inference_error", f"{type(error).__name__}: {error}"[:300])


@dataclass(frozen=True)
class FaceRegions:
    """The detector half's answer for one image: its faces (most confident first) and the model's input,
    cut for the first `len(regions)` of them."""

    faces: Faces
    regions: np.ndarray  # (k, R, R, 3) uint8: `crops.cut_region` of the k most confident faces
    boxes: np.ndarray  # (k, 3, 4) their context boxes in region coordinates
    width: int
    height: int


@dataclass(frozen=True)
class Outputs:
    """The model half's answer for a run of faces, one entry per face in each field."""

    age: np.ndarray  # (n,) years, >= 0
    distribution: np.ndarray | None  # (n, bins); None for a model without the cascade
    p_female: np.ndarray | None = None  # (n,) probability; None for a model without the gender head
    age_low: np.ndarray | None = None  # (n,) the age range's ends (`calibrate`); None for a file without one
    age_high: np.ndarray | None = None

    def part(self, start: int, end: int) -> "Outputs":
        return Outputs(*(None if value is None else value[start:end] for value in self._values()))

    def face(self, index: int) -> dict:
        return {f.name: None if value is None else value[index] for f, value in zip(fields(self), self._values())}

    def _values(self) -> list:
        return [getattr(self, f.name) for f in fields(self)]

    @staticmethod
    def join(parts: list["Outputs"]) -> "Outputs":
        values = zip(*(part._values() for part in parts))
        return Outputs(*(None if column[0] is None else np.concatenate(column) for column in values))


@dataclass(frozen=True)
class Face:
    box: np.ndarray  # (4,) [x1, y1, x2, y2] in the image's pixels
    score: float  # MTCNN probability
    landmarks: np.ndarray  # (5, 2): eyes, nose, mouth corners
    age: float
    distribution: np.ndarray | None  # over the model's bins
    p_female: float | None  # None without a gender head
    age_low: float | None  # the calibrated age range (`calibrate`); None for a model file without one
    age_high: float | None
    gender: str | None  # "female" when p_female >= 0.5, else "male"; None without a gender head


@dataclass(frozen=True)
class ImageFaces:
    """One image's answer: its faces with their outputs (most confident first, at most max_faces)."""

    faces: list[Face]
    n_faces: int  # faces over the score threshold, also those beyond max_faces
    width: int
    height: int


def decode_all(datas: list[bytes], max_pixels: int = DEFAULT_MAX_PIXELS) -> list[np.ndarray | ImageFailure]:
    """Encoded images -> RGB arrays, or the failure of each one that is not a usable image."""
    decoded: list[np.ndarray | ImageFailure] = []
    for data in datas:
        try:
            decoded.append(decode_image(data, max_pixels))
        except ImageError as error:
            decoded.append(ImageFailure.of(error))
    return decoded


class FaceFinder:
    """The detector half: RGB images -> `FaceRegions` (faces over the score threshold and their cut regions)."""

    def __init__(self, crop: CropConfig, device: str = "auto", detector: DetectorConfig = DetectorConfig()):
        self.detector = FaceDetector(device, detector)
        self.device = self.detector.device
        self.crop = crop

    def find(self, images: list[np.ndarray | ImageFailure], max_faces: int | None | list[int | None] = None) -> list[FaceRegions | ImageFailure]:
        """One answer per image, in order; regions are cut for the `max_faces` most confident faces (None: all;
        a list: one limit per image). A failure given in `images` is passed through, so callers keep one
        list from bytes to answers."""
        limits = max_faces if isinstance(max_faces, list) else [max_faces] * len(images)
        usable = [image for image in images if not isinstance(image, ImageFailure)]
        found = iter(self.detector.detect_each(usable) if usable else [])
        return [image if isinstance(image, ImageFailure) else self._cut(image, next(found), limit) for image, limit in zip(images, limits)]

    def _cut(self, image: np.ndarray, faces: Faces | Exception, max_faces: int | None) -> FaceRegions | ImageFailure:
        if isinstance(faces, Exception):
            return ImageFailure.of(faces)
        try:
            cut = [cut_region(image, box, self.crop, points) for box, points in zip(faces.boxes[:max_faces], faces.landmarks)]
        except Exception as error:  # a box the geometry refuses: this image's failure, not the batch's
            return ImageFailure.of(error)
        regions, boxes = (np.stack([r for r, _ in cut]), np.stack([b for _, b in cut])) if cut else no_regions(self.crop)
        return FaceRegions(faces, regions, boxes, image.shape[1], image.shape[0])


class Answers(torch.nn.Module):
    """The model's outputs that `Outputs` keeps, as a tuple of tensors without the heads it lacks (age; the
    distribution with the cascade; p_female with the gender head): what ONNX Runtime runs (`onnx_cpu`)."""

    def __init__(self, model: C3AE):
        super().__init__()
        self.model = model.eval()

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, ...]:
        prediction = self.model(crops)
        return tuple(value.float() for value in (prediction.age, prediction.distribution, prediction.p_female()) if value is not None)


def predict_regions(model: C3AE, regions, boxes, batch_size: int = 256, network=None) -> Outputs:
    """Regions (N, R, R, 3) uint8 and their context boxes (N, 3, 4), numpy or tensors, cut as training cuts
    them with augmentation off -> the model's `Outputs` (on the CPU, as numpy). `network`: the model's
    `Answers` run another way (ONNX Runtime, `AgeModel` on CPUs); by default PyTorch's."""
    device = next(model.parameters()).device
    regions, boxes = torch.as_tensor(regions, device=device), torch.as_tensor(boxes, device=device)
    network = network or Answers(model)
    cfg = model.cfg
    parts = [Outputs(np.zeros(0, np.float32), np.zeros((0, cfg.n_bins), np.float32) if cfg.cascade else None,
                     np.zeros(0, np.float32) if cfg.gender_head else None)]
    with torch.inference_mode():
        for start in range(0, len(regions), batch_size):
            answers = iter(network(crop_batch(regions[start:start + batch_size], boxes[start:start + batch_size])))
            age = next(answers).clamp_min(0)
            distribution, p_female = (next(answers) if present else None for present in (cfg.cascade, cfg.gender_head))
            parts.append(Outputs(*(None if value is None else value.cpu().numpy() for value in (age, distribution, p_female))))
    return Outputs.join(parts)


def predict_stored(model: C3AE, data, faces: dict, rows: np.ndarray) -> Outputs:
    """The model's `Outputs` for the stored faces picked by the mask `rows`: `faces` is `faces.read_faces(data)`
    of a preprocessing output `data`, whose region JPEGs are decoded and cut as every stage cuts them."""
    from c3ae_ray.faces import decode_regions

    index = np.flatnonzero(rows)
    regions = decode_regions([faces["jpeg"][i] for i in index], [faces["path"][i] for i in index], data.crop.region_size)
    return predict_regions(model, regions, faces["boxes"][index])


class AgeModel:
    """The model half: cut regions -> `Outputs`, in one batch. It reads the model file, its crop geometry and
    its age range's calibration (if any); on CPUs the network runs in ONNX Runtime (`onnx_cpu`)."""

    def __init__(self, model_source, device: str = "auto", name: str | None = None):
        self.device = resolve_device(device)
        model, self.payload = load_model(model_source, name=name)
        self.model = for_inference(model).to(self.device)
        self.network = None
        if self.device == "cpu":
            from c3ae_ray.onnx_cpu import OnnxCpu

            self.network = OnnxCpu(Answers(self.model), torch.zeros(2, N_SCALES, 3, CROP_SIZE, CROP_SIZE), {0: "faces"})
        self.crop = model_crop(self.payload)
        self.identity = model_identity(self.payload, name or (model_source if isinstance(model_source, (str, Path)) else "model"))
        self.bins = self.model.cfg.bins.tolist()
        self.age_range = age_range_of(self.payload)
        self._bins = self.model.cfg.bins.numpy()  # the range's spread, computed per batch

    def predict(self, regions: np.ndarray, boxes: np.ndarray) -> Outputs:
        outputs = predict_regions(self.model, regions, boxes, network=self.network)
        if self.age_range is None:
            return outputs
        low, high = bounds(outputs.age, outputs.distribution, self.age_range, self._bins)
        return replace(outputs, age_low=low.astype(np.float32), age_high=high.astype(np.float32))


def attach(found: list[FaceRegions | ImageFailure], outputs: Outputs) -> list[ImageFaces | ImageFailure]:
    """Per-image answers from the model's outputs over the concatenated regions of `found`, in order."""
    answers: list[ImageFaces | ImageFailure] = []
    start = 0
    for item in found:
        if isinstance(item, ImageFailure):
            answers.append(item)
            continue
        faces = [
            Face(item.faces.boxes[j], float(item.faces.scores[j]), item.faces.landmarks[j], **_face_outputs(outputs, start + j))
            for j in range(len(item.regions))
        ]
        answers.append(ImageFaces(faces, len(item.faces), item.width, item.height))
        start += len(item.regions)
    return answers


def _face_outputs(outputs: Outputs, index: int) -> dict:
    values = outputs.face(index)
    optional = {name: None if values[name] is None else float(values[name]) for name in ("p_female", "age_low", "age_high")}
    gender = None if optional["p_female"] is None else "female" if optional["p_female"] >= 0.5 else "male"
    return {**values, "age": float(values["age"]), **optional, "gender": gender}


def no_regions(crop: CropConfig) -> tuple[np.ndarray, np.ndarray]:
    side = crop.region_size
    return np.zeros((0, side, side, 3), np.uint8), np.zeros((0, N_SCALES, 4), np.float32)


def regions_of(found: list[FaceRegions | ImageFailure], crop: CropConfig) -> tuple[np.ndarray, np.ndarray]:
    """The concatenated regions and boxes of every answer that has faces, in order (the model's one batch)."""
    cut = [item for item in found if not isinstance(item, ImageFailure)]
    if not cut:
        return no_regions(crop)
    return np.concatenate([item.regions for item in cut]), np.concatenate([item.boxes for item in cut])


class Estimator:
    """Both halves in one process: images -> `ImageFaces` or `ImageFailure` each (scoring's actor, `c3ae predict`)."""

    def __init__(self, model_source, device: str = "auto", detector: DetectorConfig = DetectorConfig(),
                 max_faces: int | None = None, name: str | None = None):
        self.age_model = AgeModel(model_source, device, name)
        self.finder = FaceFinder(self.age_model.crop, self.age_model.device, detector)
        self.device = self.age_model.device
        self.max_faces = max_faces

    def estimate(self, images: list[np.ndarray | ImageFailure], max_faces: list[int | None] | None = None) -> list[ImageFaces | ImageFailure]:
        """One answer per image, in order; a failure given in `images` is passed through. `max_faces`: one
        limit per image (default: the estimator's own)."""
        found = self.finder.find(images, self.max_faces if max_faces is None else max_faces)
        return attach(found, self.age_model.predict(*regions_of(found, self.age_model.crop)))

    def estimate_encoded(self, datas: list[bytes], max_pixels: int = DEFAULT_MAX_PIXELS) -> list[ImageFaces | ImageFailure]:
        return self.estimate(decode_all(datas, max_pixels))


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc's malloc_trim; a no-op elsewhere).

    MTCNN allocates tensors of ever-changing sizes (its later stages run on however many candidate boxes an
    image gives), which fragments glibc's heap: without this a long-lived detector's memory creeps up with
    the number of images it has seen. Every few batches it costs nothing measurable.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
