"""Batch scoring: every face in an image store -> one Parquet row with its estimated age.

    c3ae score --input DIR|FILE_LIST|IMAGE|s3://bucket/prefix --out PATH|s3://... --model model.pt

Ray Data runs it: the listed images -> read tasks that fetch each file's bytes (a file that cannot be read
becomes an error row, never a failed block) -> an actor pool where each actor holds one `AgeEstimator`
(MTCNN, the crop geometry of `c3ae_ray.crops`, C3AE) and turns a batch of images into rows -> Parquet.
Detector and model share an actor: the model's crops are cut from the decoded image, which a second pool
would have to receive through the object store, and on CPU the model is a small share of the work
(see the benchmark). The output folder:

    OUT/predictions/*.parquet   one row per face (status face), per image without a face (no_face) and per
                                image that could not be read or decoded (error, with a short reason)
    OUT/summary.json            counts, timing, the model's name and version, configs; written last

It is written into a staging folder and published whole (`c3ae_ray.storage.publish`): a rerun into the
same --out is refused unless --overwrite, and a crash never leaves files that look complete.
"""

from __future__ import annotations

import ctypes
import math
import posixpath
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch

from c3ae_ray import __version__, storage
from c3ae_ray.augment import crop_batch
from c3ae_ray.crops import CropConfig, cut_region
from c3ae_ray.datasets import IMAGE_EXTENSIONS
from c3ae_ray.detect import DetectorConfig, FaceDetector, Faces, resolve_device
from c3ae_ray.images import DEFAULT_MAX_PIXELS, ImageError, decode_image
from c3ae_ray.model import C3AE, load_model, model_crop, model_identity
from c3ae_ray.runtime import cluster_shape, pool_shape, ray_runtime

STATUSES = ("face", "no_face", "error")
MAX_FILE_BYTES = 256 * 2**20  # a larger file is an error row: no image under the pixel cap needs more

SCHEMA = pa.schema(
    [
        ("path", pa.string()),  # the image as listed: an absolute local path or a full URI (s3://bucket/key)
        ("status", pa.string()),  # face, no_face or error
        ("reason", pa.string()),  # error rows: "code: detail" (read_error, too_large, undecodable, ...)
        ("face_index", pa.int16()),  # 0 for the most confident face of an image, 1 for the next, ...
        ("n_faces", pa.int16()),  # faces over --min-face-score in the image, also those beyond --max-faces
        ("image_width", pa.int32()),
        ("image_height", pa.int32()),
        ("box", pa.list_(pa.float32())),  # [x1, y1, x2, y2] in the original image's pixels
        ("landmarks", pa.list_(pa.float32())),  # 5 (x, y) points flattened: eyes, nose, mouth corners
        ("face_score", pa.float32()),  # MTCNN probability
        ("age", pa.float32()),  # years
        ("distribution", pa.list_(pa.float32())),  # probabilities over the model's age bins (summary.json: bins)
        ("model_name", pa.string()),
        ("model_version", pa.string()),
    ]
)


@dataclass(frozen=True)
class ScoreConfig:
    input: str
    out: str
    model: str
    device: str = "auto"
    actors: int | None = None  # pool size; default from the cluster's CPUs or GPUs
    batch_size: int = 32  # images per read task and per actor call
    min_face_score: float = 0.9  # MTCNN probability for a detection to count as a face
    max_faces: int | None = None  # per image, most confident first (None: all)
    max_pixels: int = DEFAULT_MAX_PIXELS
    overwrite: bool = False
    detector: DetectorConfig = field(default_factory=DetectorConfig)

    def to_dict(self) -> dict:
        return {**asdict(self), "detector": self.detector.to_dict()}


# ---- inference: images -> faces with ages (no Ray; serving and the benchmark use it too) ----


@dataclass(frozen=True)
class FaceAge:
    box: np.ndarray  # (4,) [x1, y1, x2, y2] in the image's pixels
    score: float
    landmarks: np.ndarray  # (5, 2)
    age: float
    distribution: np.ndarray | None  # over the model's bins; None for a model without the cascade


@dataclass(frozen=True)
class ImageAges:
    faces: list[FaceAge]  # most confident first, at most max_faces
    n_faces: int  # faces over the score threshold before the max_faces cut


def predict_regions(model: C3AE, regions: torch.Tensor, boxes: torch.Tensor, crop_size: int, batch_size: int = 256):
    """Regions (N, R, R, 3) uint8 and their context boxes (N, S, 4), cut exactly as training cuts them
    (augmentation off) -> (ages (N,) >= 0, bin distributions (N, B) or None), as numpy arrays."""
    model.eval()
    ages, distributions = [], []
    with torch.inference_mode():
        for region_batch, box_batch in zip(regions.split(batch_size), boxes.split(batch_size)):
            age, distribution = model(crop_batch(region_batch, box_batch, crop_size))
            ages.append(age.float().clamp_min(0))
            if distribution is not None:
                distributions.append(distribution.float())
    if not ages:
        return np.zeros(0, np.float32), None
    return torch.cat(ages).cpu().numpy(), torch.cat(distributions).cpu().numpy() if distributions else None


@dataclass(frozen=True)
class CutFaces:
    """One image's faces over the score threshold, with the model's input cut for the first `len(regions)`."""

    faces: Faces  # most confident first
    regions: np.ndarray  # (k, R, R, 3) uint8: `crops.cut_region` of the k most confident faces
    boxes: np.ndarray  # (k, S, 4) their context boxes in region coordinates


class FaceCutter:
    """The detector half of inference: RGB images -> faces over `min_face_score` and their cut regions."""

    def __init__(
        self,
        crop: CropConfig,
        device: str = "auto",
        min_face_score: float = 0.9,
        detector: DetectorConfig = DetectorConfig(),
    ):
        self.detector = FaceDetector(device, detector)
        self.device = self.detector.device
        self.crop = crop
        self.min_face_score = min_face_score

    def cut(self, images: list[np.ndarray], max_faces: list[int | None]) -> list[CutFaces | Exception]:
        """One result per image, in order; an image the detector or the crops fail on gives its exception."""
        results: list[CutFaces | Exception] = []
        for image, faces, limit in zip(images, self.detector.detect_each(images) if images else [], max_faces):
            if isinstance(faces, Exception):
                results.append(faces)
                continue
            faces = faces.above(self.min_face_score)
            try:
                cut = [cut_region(image, box, self.crop) for box in faces.boxes[:limit]]
            except Exception as error:
                results.append(error)
                continue
            side, scales = self.crop.region_size, len(self.crop.scales)
            results.append(
                CutFaces(
                    faces,
                    np.stack([r for r, _ in cut]) if cut else np.zeros((0, side, side, 3), np.uint8),
                    np.stack([b for _, b in cut]) if cut else np.zeros((0, scales, 4), np.float32),
                )
            )
        return results


class AgeModel:
    """The model half of inference: cut regions -> ages and bin distributions, in one batch."""

    def __init__(self, model_source, device: str = "auto"):
        self.device = resolve_device(device)
        self.model, self.payload = load_model(model_source)
        self.model.to(self.device)
        self.crop = model_crop(self.payload)

    def predict(self, regions: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if not len(regions):
            return np.zeros(0, np.float32), None
        return predict_regions(
            self.model,
            torch.from_numpy(regions).to(self.device),
            torch.from_numpy(boxes).to(self.device),
            self.crop.size,
        )


def ages_of(cut: list[CutFaces | Exception], ages: np.ndarray, distributions: np.ndarray | None):
    """Per-image results from the model's output over the concatenated regions of `cut`, in order."""
    results: list[ImageAges | Exception] = []
    start = 0
    for item in cut:
        if isinstance(item, Exception):
            results.append(item)
            continue
        faces = item.faces
        results.append(
            ImageAges(
                [
                    FaceAge(
                        faces.boxes[j],
                        float(faces.scores[j]),
                        faces.landmarks[j],
                        float(ages[start + j]),
                        None if distributions is None else distributions[start + j],
                    )
                    for j in range(len(item.regions))
                ],
                len(faces),
            )
        )
        start += len(item.regions)
    return results


class AgeEstimator:
    """RGB images -> every face's box, detector score and age: MTCNN, then `crops.cut_region` and the batched
    crops that training uses, then C3AE in one batch. Scoring runs both halves in one actor; serving runs
    `FaceCutter` and `AgeModel` as separate deployments and joins them with `ages_of`."""

    def __init__(
        self,
        model_source,
        device: str = "auto",
        min_face_score: float = 0.9,
        max_faces: int | None = None,
        detector: DetectorConfig = DetectorConfig(),
    ):
        if max_faces is not None and max_faces < 1:
            raise ValueError(f"max_faces must be at least 1, got {max_faces}")
        self.age_model = AgeModel(model_source, device)
        self.cutter = FaceCutter(self.age_model.crop, self.age_model.device, min_face_score, detector)
        self.device, self.crop, self.model = self.age_model.device, self.age_model.crop, self.age_model.model
        self.max_faces = max_faces

    def estimate(self, images: list[np.ndarray]) -> list[ImageAges | Exception]:
        """One result per image, in order; an image the detector or the crops fail on gives its exception."""
        cut = self.cutter.cut(images, [self.max_faces] * len(images))
        kept = [item for item in cut if not isinstance(item, Exception)]
        if not kept:
            return ages_of(cut, np.zeros(0, np.float32), None)
        ages, distributions = self.age_model.predict(
            np.concatenate([item.regions for item in kept]), np.concatenate([item.boxes for item in kept])
        )
        return ages_of(cut, ages, distributions)


# ---- the image store: listing and reading ----


def _is_image(path: str) -> bool:
    name = posixpath.basename(path)
    return not name.startswith(".") and posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _store(location: str) -> tuple[str, str]:
    """'s3://bucket/key' -> ('s3://bucket', 'bucket/key'); a local path -> ('', absolute path)."""
    if "://" not in location:
        return "", str(Path(location).resolve())
    scheme, rest = location.split("://", 1)
    return f"{scheme}://{rest.split('/', 1)[0]}", rest


def list_images(location: str) -> tuple[list[str], dict[str, pafs.FileSystem]]:
    """--input -> (image locations, sorted, {store: filesystem}).

    A folder or prefix: every image file under it (by extension, hidden files left out), recursively. An
    image file: itself. Any other file: a list, one location per line (local path or URI; relative paths
    are relative to the list's folder; blank lines and # comments skipped); its entries are taken as they
    are, so a missing or broken one becomes an error row.
    """
    filesystem, path = storage.resolve(location)
    info = filesystem.get_file_info(path)
    scheme = location.split("://", 1)[0] + "://" if "://" in location else ""
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"--input {location} does not exist")
    if info.type == pafs.FileType.Directory:
        images = [scheme + p for p in storage.files_under(filesystem, path) if _is_image(p)]
        if not images:
            raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {location}")
    elif _is_image(path):
        images = [scheme + path]
    else:
        with filesystem.open_input_stream(path) as stream:
            try:
                lines = stream.read().decode("utf-8").splitlines()
            except UnicodeDecodeError:
                raise ValueError(f"--input {location} is neither an image nor a UTF-8 list of images") from None
        folder = posixpath.dirname(scheme + path)
        entries = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        images = sorted(e if "://" in e or posixpath.isabs(e) else posixpath.join(folder, e) for e in entries)
        if not images:
            raise ValueError(f"the list {location} names no images")
    stores = {_store(image)[0] for image in images}
    filesystems = {store: storage.resolve(store)[0] if store else pafs.LocalFileSystem() for store in stores}
    return images, filesystems


def read_images(batch: pa.Table, filesystems: dict[str, pafs.FileSystem]) -> pa.Table:
    """Ray Data task: paths -> (path, data, error). Reads at most MAX_FILE_BYTES + 1 bytes of any file."""
    data, errors = [], []
    for location in batch.column("path").to_pylist():
        store, path = _store(location)
        try:
            with filesystems[store].open_input_stream(path) as stream:
                content = stream.read(MAX_FILE_BYTES + 1)
            if len(content) > MAX_FILE_BYTES:
                data.append(None)
                errors.append(f"too_large: file over {MAX_FILE_BYTES // 2**20} MiB")
                continue
            data.append(content)
            errors.append(None)
        except Exception as error:  # missing, a folder, no permission, a store error: the row says which
            data.append(None)
            errors.append(f"read_error: {type(error).__name__}: {str(error)[:200]}")
    return pa.table({"path": batch.column("path"), "data": pa.array(data, pa.binary()), "error": pa.array(errors, pa.string())})


# ---- rows ----


def _row(path: str, status: str, identity: tuple[str, str], **values) -> dict:
    return {**{name: None for name in SCHEMA.names}, "path": path, "status": status,
            "model_name": identity[0], "model_version": identity[1], **values}


def score_batch(batch: pa.Table, estimator: AgeEstimator, identity: tuple[str, str], max_pixels: int) -> pa.Table:
    """(path, data, error) rows -> output rows: one per face, one per image without faces or in error. No Ray."""
    rows, pending = [], []
    for record in batch.to_pylist():
        if record["error"] is not None:
            rows.append(_row(record["path"], "error", identity, reason=record["error"]))
            continue
        try:
            pending.append((record["path"], decode_image(record["data"], max_pixels)))
        except ImageError as error:
            rows.append(_row(record["path"], "error", identity, reason=f"{error.reason}: {error}"))
    results = estimator.estimate([image for _, image in pending])
    for (path, image), result in zip(pending, results):
        size = {"image_width": image.shape[1], "image_height": image.shape[0]}
        if isinstance(result, Exception):
            rows.append(_row(path, "error", identity, reason=f"inference_error: {type(result).__name__}: {result}", **size))
        elif not result.faces:
            rows.append(_row(path, "no_face", identity, n_faces=result.n_faces, **size))
        else:
            for index, face in enumerate(result.faces):
                rows.append(
                    _row(
                        path, "face", identity,
                        face_index=index,
                        n_faces=result.n_faces,
                        box=face.box.tolist(),
                        landmarks=face.landmarks.reshape(-1).tolist(),
                        face_score=face.score,
                        age=face.age,
                        distribution=None if face.distribution is None else face.distribution.tolist(),
                        **size,
                    )
                )
    return pa.Table.from_pylist(rows, schema=SCHEMA)


class FaceScorer:
    """Ray Data actor: one AgeEstimator (detector and model) turning batches of read images into rows."""

    def __init__(self, cfg: ScoreConfig, model_bytes: bytes, identity: tuple[str, str]):
        self.estimator = AgeEstimator(model_bytes, cfg.device, cfg.min_face_score, cfg.max_faces, cfg.detector)
        if self.estimator.device == "cpu":
            torch.set_num_threads(1)  # one busy thread per actor; the pool is sized by CPUs
        self.cfg = cfg
        self.identity = identity
        self.calls = 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.calls += 1
        if self.calls % 16 == 0:
            release_free_memory()
        return score_batch(batch, self.estimator, self.identity, self.cfg.max_pixels)


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc's malloc_trim; a no-op elsewhere).

    MTCNN allocates tensors of ever-changing sizes (its later stages run on however many candidate boxes an
    image gives), which fragments glibc's heap: without this an actor's memory creeps up with the number of
    images it has seen. Every 16 batches it costs nothing measurable.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ---- the stage ----


def _count(filesystem: pafs.FileSystem, folder: str) -> dict:
    """Counts from the written Parquet (small columns only): images = one face-0 row, no_face or error row each."""
    import pyarrow.dataset as pads

    table = pads.dataset(folder, filesystem=filesystem, format="parquet").to_table(columns=["status", "face_index", "reason"])
    counts = {"images": 0, "faces": 0, "images_with_faces": 0, "no_face": 0, "errors": 0}
    reasons: dict[str, int] = {}
    for status, index, reason in zip(*(table.column(c).to_pylist() for c in ("status", "face_index", "reason"))):
        if status == "face":
            counts["faces"] += 1
            counts["images_with_faces"] += index == 0
        elif status == "no_face":
            counts["no_face"] += 1
        else:
            counts["errors"] += 1
            code = reason.split(":", 1)[0]
            reasons[code] = reasons.get(code, 0) + 1
    counts["images"] = counts["images_with_faces"] + counts["no_face"] + counts["errors"]
    return {**counts, "error_reasons": reasons}


def score(cfg: ScoreConfig) -> dict:
    """Score every image of cfg.input; -> the summary (also OUT/summary.json). Bad images are rows, not failures."""
    import ray
    from ray.data import ActorPoolStrategy

    started = time.perf_counter()
    if cfg.max_faces is not None and cfg.max_faces < 1:
        raise ValueError(f"--max-faces must be at least 1, got {cfg.max_faces}")
    model_bytes = storage.read_bytes(cfg.model)
    model, payload = load_model(model_bytes, name=cfg.model)  # a bad --model fails here, before any work
    identity = model_identity(payload, cfg.model)
    images, filesystems = list_images(cfg.input)
    out_fs, out = storage.resolve(cfg.out)
    storage.check_writable(out_fs, out, cfg.overwrite)
    staging = storage.staging_path(out)
    try:
        with ray_runtime():
            device, actors, cpus, gpus = pool_shape(cluster_shape(), cfg.device, cfg.actors)
            run_cfg = replace(cfg, device=device)
            blocks = min(len(images), max(8 * actors, math.ceil(len(images) / 1000)))
            pipeline_started = time.perf_counter()
            (
                ray.data.from_items([{"path": image} for image in images], override_num_blocks=blocks)
                .map_batches(read_images, fn_kwargs={"filesystems": filesystems}, batch_size=cfg.batch_size, batch_format="pyarrow")
                .map_batches(
                    FaceScorer,
                    fn_constructor_kwargs={"cfg": run_cfg, "model_bytes": model_bytes, "identity": identity},
                    batch_size=cfg.batch_size,
                    batch_format="pyarrow",
                    compute=ActorPoolStrategy(size=actors),
                    num_cpus=cpus,
                    num_gpus=gpus,
                )
                .write_parquet(f"{staging}/predictions", filesystem=out_fs)
            )
            pipeline_s = time.perf_counter() - pipeline_started
        counts = _count(out_fs, f"{staging}/predictions")
        elapsed = time.perf_counter() - started
        summary = {
            "input": cfg.input,
            "out": cfg.out,
            "listed": len(images),
            **counts,
            "elapsed_s": round(elapsed, 2),
            "pipeline_s": round(pipeline_s, 2),  # the Ray Data run alone: no listing, Ray start-up or publishing
            "images_per_s": round(counts["images"] / elapsed, 2),
            "device": device,
            "actors": actors,
            "model": {"location": cfg.model, "name": identity[0], "version": identity[1], "sha256": payload["sha256"],
                      "config": asdict(model.cfg), "bins": model.cfg.bins.tolist()},
            "crop": model_crop(payload).to_dict(),
            "config": run_cfg.to_dict(),
            "schema": {name: str(SCHEMA.field(name).type) for name in SCHEMA.names},
            "c3ae_ray_version": __version__,
        }
        if counts["images"] != len(images):
            raise RuntimeError(f"{len(images)} images were listed but {counts['images']} have rows: output not published")
        storage.publish(out_fs, staging, out, summary, cfg.overwrite)
        return summary
    finally:
        storage.delete_tree(out_fs, staging)


def format_summary(summary: dict) -> str:
    """The lines the CLI prints at the end."""
    model = summary["model"]
    lines = [
        f"scored {summary['images']} images from {summary['input']} -> {summary['out']} "
        f"with {model['name']} (version {model['version']})",
        f"  faces {summary['faces']} in {summary['images_with_faces']} images, no_face {summary['no_face']}, "
        f"errors {summary['errors']}",
    ]
    if summary["error_reasons"]:
        lines.append(f"  errors by reason: {summary['error_reasons']}")
    lines.append(
        f"  {summary['elapsed_s']} s ({summary['pipeline_s']} s in the Ray Data pipeline), "
        f"{summary['images_per_s']} images/s on {summary['actors']} {summary['device']} actor(s)"
    )
    return "\n".join(lines)
