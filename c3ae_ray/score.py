"""Batch scoring: every face in an image store (photos and videos) -> one Parquet row with its estimated age.

    c3ae score --input DIR|FILE_LIST|IMAGE|s3://bucket/prefix --out PATH|s3://... --model model.pt

It runs the batch skeleton (`c3ae_ray.batch`): the listed images -> read tasks that fetch each file's bytes
(a file that cannot be read becomes an error row, never a failed block) -> an actor pool where each actor
holds one `inference.Estimator` (MTCNN, the crop geometry of `c3ae_ray.crops`, C3AE) and turns a batch of
images into rows -> Parquet. A video is decoded in the actor into frames sampled at --fps, each answered as a
photo with its time (`time_s`). Detector and model share an actor: the model's crops are cut from the decoded
image, which a second pool would have to receive through the object store, and on CPU the model is a small
share of the work (see the benchmark). The output folder:

    OUT/predictions/*.parquet   one row per face (status face), per image or sampled frame without a face
                                (no_face) and per file that could not be read or decoded (error, with a
                                short reason)
    OUT/summary.json            counts, timing, the model's name and version, configs; written last

A rerun into the same --out is refused unless --overwrite, and a crash never leaves files that look complete.
"""

from __future__ import annotations

import posixpath
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from itertools import islice

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from c3ae_ray import __version__, storage
from c3ae_ray.batch import PROGRESS_INTERVAL_S, BatchJob, PoolWorker, decoded_inputs, filesystems_for, run_batch, status_counts
from c3ae_ray.config import NotFoundError, UserError, check, to_dict
from c3ae_ray.datasets import IMAGE_EXTENSIONS
from c3ae_ray.detect import DetectorConfig
from c3ae_ray.images import DEFAULT_FPS, DEFAULT_MAX_PIXELS, VIDEO_EXTENSIONS, ImageError, decode_video, is_video
from c3ae_ray.inference import Estimator, ImageFailure, ImageFaces
from c3ae_ray.model import BUNDLED_MODEL, load_model, model_crop, model_identity

SCHEMA = pa.schema(
    [
        ("path", pa.string()),  # the image as listed: an absolute local path or a full URI (s3://bucket/key)
        ("status", pa.string()),  # face, no_face or error
        ("reason", pa.string()),  # error rows: "code: detail" (read_error, too_large, undecodable, ...)
        ("time_s", pa.float32()),  # a video's sampled frame: seconds from its start; null for a photo
        ("face_index", pa.int16()),  # 0 for the most confident face of an image, 1 for the next, ...
        ("n_faces", pa.int16()),  # faces over --min-face-score in the image, also those beyond --max-faces
        ("image_width", pa.int32()),
        ("image_height", pa.int32()),
        ("box", pa.list_(pa.float32())),  # [x1, y1, x2, y2] in the original image's pixels
        ("landmarks", pa.list_(pa.float32())),  # 5 (x, y) points flattened: eyes, nose, mouth corners
        ("face_score", pa.float32()),  # MTCNN probability
        ("age", pa.float32()),  # years
        ("age_low", pa.float32()),  # the age range (summary.json: model.age_range.coverage); null for a file without one
        ("age_high", pa.float32()),
        ("distribution", pa.list_(pa.float32())),  # probabilities over the model's age bins (summary.json: bins)
        ("gender", pa.string()),  # "female" or "male"; null for a model without a gender head
        ("p_female", pa.float32()),  # the gender head's probability of "female"
        ("model_name", pa.string()),
        ("model_version", pa.string()),
    ]
)


@dataclass(frozen=True)
class ScoreConfig:
    input: str  # a folder, an image, a list of images (a line each) or s3://bucket/prefix
    out: str  # output folder: a local path or s3://bucket/prefix
    model: str = str(BUNDLED_MODEL)  # a model.pt from `c3ae train` (path or s3://)
    device: str = "auto"
    actors: int | None = None  # detector+model actors; default one per CPU, or per GPU
    batch_size: int = 32  # images per read task and per actor call
    max_faces: int | None = None  # per image, most confident first (None: all)
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are error rows, never decoded
    fps: float = DEFAULT_FPS  # video frames sampled per second
    overwrite: bool = False  # replace an existing out once the new one is complete
    progress_s: float = PROGRESS_INTERVAL_S  # seconds between progress lines (0: none)
    detector: DetectorConfig = field(default_factory=DetectorConfig)

    def __post_init__(self):
        check(self.max_faces is None or self.max_faces >= 1, f"--max-faces must be at least 1, got {self.max_faces}")
        check(self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}")
        check(self.progress_s >= 0, f"progress_s must not be negative, got {self.progress_s}")
        check(self.fps > 0, f"fps must be positive, got {self.fps}")


# ---- the image store: listing ----


INPUT_EXTENSIONS = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS


def _is_image(path: str) -> bool:
    """An image or a video, by extension (hidden files left out)."""
    name = posixpath.basename(path)
    return not name.startswith(".") and posixpath.splitext(name)[1].lower() in INPUT_EXTENSIONS


def list_images(location: str) -> list[str]:
    """--input -> image locations, sorted.

    A folder or prefix: every image file under it (by extension, hidden files left out), recursively. An
    image file: itself. Any other file: a list, one location per line (local path or URI; relative paths
    are relative to the list's folder; blank lines and # comments skipped); its entries are taken as they
    are, so a missing or broken one becomes an error row.
    """
    filesystem, path = storage.resolve(location)
    info = filesystem.get_file_info(path)
    scheme = location.split("://", 1)[0] + "://" if "://" in location else ""
    if info.type == pafs.FileType.NotFound:
        raise NotFoundError(f"--input {location} does not exist")
    if info.type == pafs.FileType.Directory:
        images = [scheme + p for p in storage.files_under(filesystem, path) if _is_image(p)]
        if not images:
            raise UserError(f"no images or videos ({', '.join(sorted(INPUT_EXTENSIONS))}) under {location}")
    elif _is_image(path):
        images = [scheme + path]
    else:
        with filesystem.open_input_stream(path) as stream:
            try:
                lines = stream.read().decode("utf-8").splitlines()
            except UnicodeDecodeError:
                raise UserError(f"--input {location} is neither an image nor a UTF-8 list of images") from None
        folder = posixpath.dirname(scheme + path)
        entries = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        images = sorted(e if "://" in e or posixpath.isabs(e) else posixpath.join(folder, e) for e in entries)
        if not images:
            raise UserError(f"the list {location} names no images")
    return images


# ---- rows ----


def _row(path: str, status: str, identity: tuple[str, str], **values) -> dict:
    return {**{name: None for name in SCHEMA.names}, "path": path, "status": status,
            "model_name": identity[0], "model_version": identity[1], **values}


def answer_rows(path: str, answer: ImageFaces | ImageFailure, identity: tuple[str, str], time_s: float | None = None) -> list[dict]:
    """One image's (or sampled frame's) answer -> its output rows: one per face, or one no_face or error row."""
    if isinstance(answer, ImageFailure):
        return [_row(path, "error", identity, reason=answer.reason, time_s=time_s)]
    size = {"image_width": answer.width, "image_height": answer.height, "n_faces": answer.n_faces, "time_s": time_s}
    if not answer.faces:
        return [_row(path, "no_face", identity, **size)]
    return [
        _row(
            path, "face", identity, **size,
            face_index=index,
            box=face.box.tolist(),
            landmarks=face.landmarks.reshape(-1).tolist(),
            face_score=face.score,
            age=face.age,
            age_low=face.age_low,
            age_high=face.age_high,
            distribution=None if face.distribution is None else face.distribution.tolist(),
            gender=face.gender,
            p_female=face.p_female,
        )
        for index, face in enumerate(answer.faces)
    ]


class FaceScorer(PoolWorker):
    """Read images -> rows, with one Estimator (detector and model) per actor."""

    def __init__(self, cfg: ScoreConfig, model_bytes: bytes, device: str, tally=None):
        super().__init__(device, tally)
        self.cfg = cfg
        self.estimator = Estimator(model_bytes, device, cfg.detector, cfg.max_faces, name=cfg.model)

    def rows(self, records: list[dict]) -> pa.Table:
        pictures = frame_inputs(records, self.cfg.max_pixels, self.cfg.fps)
        identity = self.estimator.age_model.identity
        rows = []
        while part := list(islice(pictures, self.cfg.batch_size)):  # a video's frames arrive as they are decoded
            answers = self.estimator.estimate([image for _, _, image in part])
            rows += [row for (path, time_s, _), answer in zip(part, answers) for row in answer_rows(path, answer, identity, time_s)]
        return pa.Table.from_pylist(rows, schema=SCHEMA)


def frame_inputs(records: list[dict], max_pixels: int, fps: float) -> Iterator[tuple[str, float | None, np.ndarray | ImageFailure]]:
    """Read rows -> (path, time_s, image or ImageFailure) for the inference path: a photo (or a row that failed to
    read) gives one entry with time_s None, a video one per frame sampled at `fps` as decoded (or its one failure)."""
    videos = {i for i, r in enumerate(records) if r["error"] is None and is_video(r["path"])}
    photos = iter(decoded_inputs([r for i, r in enumerate(records) if i not in videos], max_pixels))
    for i, record in enumerate(records):
        if i not in videos:
            yield record["path"], None, next(photos)
            continue
        try:
            for time_s, frame in decode_video(record["data"], fps, max_pixels, posixpath.splitext(record["path"])[1]):
                yield record["path"], time_s, frame
        except ImageError as error:  # a video's come before its first frame
            yield record["path"], None, ImageFailure.of(error)


# ---- the stage ----


def score(cfg: ScoreConfig) -> dict:
    """Score every image of cfg.input; -> the summary (also OUT/summary.json). Bad images are rows, not failures."""
    started = time.perf_counter()
    model_bytes = storage.read_bytes(cfg.model)
    model, payload = load_model(model_bytes, name=cfg.model)  # a bad --model fails here, before any work
    name, version = model_identity(payload, cfg.model)
    images = list_images(cfg.input)

    def summarize(filesystem, staging: str, run: dict) -> dict:
        statuses, reasons, table = status_counts(filesystem, f"{staging}/predictions", "error", ("face_index", "path", "time_s"))
        columns = (table.column(name).to_pylist() for name in ("status", "face_index", "path", "time_s"))
        # one entry per answered picture (a photo, a sampled frame, or a file that failed): its first row
        pictures = [(status, path, time_s) for status, index, path, time_s in zip(*columns) if status != "face" or index == 0]
        with_faces = sum(status == "face" for status, _, _ in pictures)
        video_paths = {path for _, path, time_s in pictures if time_s is not None}
        frames = len(pictures) - sum(time_s is None for _, _, time_s in pictures)
        counts = {"images": len(pictures) - frames + len(video_paths), "videos": len(video_paths), "video_frames": frames,
                  "faces": statuses["face"], "images_with_faces": with_faces, "no_face": statuses["no_face"],
                  "errors": statuses["error"], "error_reasons": reasons}
        if counts["images"] != len(images):
            raise RuntimeError(f"{len(images)} files were listed but {counts['images']} have rows: output not published")
        elapsed = time.perf_counter() - started
        return {
            "input": cfg.input, "out": cfg.out, "listed": len(images), **counts,
            "elapsed_s": round(elapsed, 2),
            "pipeline_s": run["pipeline_s"],  # the Ray Data run alone: no listing, Ray start-up or publishing
            "images_per_s": round(counts["images"] / elapsed, 2),
            "device": run["device"], "actors": run["actors"],
            "model": {"location": cfg.model, "name": name, "version": version, "sha256": payload["sha256"],
                      "config": to_dict(model.cfg), "bins": model.cfg.bins.tolist(), "age_range": payload.get("age_range")},
            "crop": to_dict(model_crop(payload)),
            "config": to_dict(replace(cfg, device=run["device"])),
            "schema": {name: str(SCHEMA.field(name).type) for name in SCHEMA.names},
            "c3ae_ray_version": __version__,
        }

    job = BatchJob([{"path": image} for image in images], FaceScorer, {"cfg": cfg, "model_bytes": model_bytes},
                   cfg.out, cfg.overwrite, cfg.device, cfg.actors, cfg.batch_size, "predictions", filesystems=filesystems_for(images),
                   name="score", progress_s=cfg.progress_s)
    return run_batch(job, summarize)


def format_summary(summary: dict) -> str:
    """The lines the CLI prints at the end."""
    model = summary["model"]
    lines = [
        f"scored {summary['images']} images from {summary['input']} -> {summary['out']} "
        f"with {model['name']} (version {model['version']})",
        f"  faces {summary['faces']} in {summary['images_with_faces']} images, no_face {summary['no_face']}, "
        f"errors {summary['errors']}",
    ]
    if summary["videos"]:
        lines.append(f"  of the images: {summary['videos']} video(s), sampled into {summary['video_frames']} frames "
                     f"(counted as images in the line above)")
    if summary["error_reasons"]:
        lines.append(f"  errors by reason: {summary['error_reasons']}")
    lines.append(
        f"  {summary['elapsed_s']} s ({summary['pipeline_s']} s in the Ray Data pipeline), "
        f"{summary['images_per_s']} images/s on {summary['actors']} {summary['device']} actor(s)"
    )
    return "\n".join(lines)
