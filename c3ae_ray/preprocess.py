"""Preprocessing: a face-age dataset in its published layout -> Parquet that training reads without ever
touching the raw images or the detector again.

Ray Data runs it: the dataset's records -> an actor pool where each actor reads, decodes, detects (MTCNN)
and cuts the face region of a batch of images -> Parquet, partitioned by status. The output folder:

    OUT/faces/*.parquet      one row per kept face (exactly one face over --min-face-score, age in range)
    OUT/skipped/status=*/    one row per image not kept: no_face, multi_face, bad_age, unreadable (+ reason)
    OUT/summary.json         counts, timing, configs and schema; written last (readers require it)

A row's `region_jpeg` is `c3ae_ray.crops.cut_region`'s output: the reflect-padded square around the
largest context box plus a margin, at 154x154, JPEG-encoded; `region_boxes` holds the three context boxes
in its coordinates. Training cuts the 64x64 crops from it (with the paper's random box shift) by the same
geometry that scoring and serving use on full images.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace

import cv2
import numpy as np
import pyarrow as pa

from c3ae_ray import __version__, storage
from c3ae_ray.crops import CropConfig, cut_region
from c3ae_ray.datasets import read_dataset
from c3ae_ray.detect import DetectorConfig, FaceDetector
from c3ae_ray.images import DEFAULT_MAX_PIXELS, ImageError, read_image
from c3ae_ray.runtime import cluster_shape, pool_shape, ray_runtime

STATUSES = ("kept", "no_face", "multi_face", "bad_age", "unreadable")

SCHEMA = pa.schema(
    [
        ("path", pa.string()),  # source image as listed by the dataset reader
        ("dataset", pa.string()),
        ("subject", pa.string()),  # person id where the dataset has one (FG-NET, IMDB), else null
        ("age", pa.float32()),  # years; null only for an unlabelled folder
        ("gender", pa.string()),  # "female", "male" or null, one convention for every dataset
        ("status", pa.string()),  # partition column: it names the folder, not a column in the files
        ("reason", pa.string()),  # why an image was not kept ("code: detail"); null for kept faces
        ("n_faces", pa.int16()),  # faces over the score threshold; null when the image was not read
        ("image_width", pa.int32()),
        ("image_height", pa.int32()),
        ("face_box", pa.list_(pa.float32())),  # [x1, y1, x2, y2] in the original image's pixels
        ("landmarks", pa.list_(pa.float32())),  # 5 (x, y) points flattened: eyes, nose, mouth corners
        ("face_score", pa.float32()),  # MTCNN probability
        ("region_jpeg", pa.binary()),  # cut_region output, RGB JPEG, region_size x region_size
        ("region_boxes", pa.list_(pa.float32())),  # 3 context boxes [x1, y1, x2, y2] in region pixels, flattened
    ]
)


@dataclass(frozen=True)
class PreprocessConfig:
    dataset: str
    root: str
    out: str
    csv: str | None = None  # folder layout: labels CSV (path,age[,subject])
    device: str = "auto"
    detectors: int | None = None  # actor pool size; default from the cluster's CPUs or GPUs
    batch_size: int = 32
    limit: int | None = None  # first N records (sorted by path)
    min_face_score: float = 0.9  # MTCNN probability for a detection to count as a face
    min_age: float = 0.0
    max_age: float = 120.0
    mat_min_face_score: float | None = 1.0  # IMDB-WIKI's own face_score filter (None: off)
    drop_second_face: bool = True  # IMDB-WIKI: drop images where the dataset saw a second face
    max_pixels: int = DEFAULT_MAX_PIXELS
    jpeg_quality: int = 95
    overwrite: bool = False
    crop: CropConfig = field(default_factory=CropConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)

    def to_dict(self) -> dict:
        return {**asdict(self), "crop": self.crop.to_dict(), "detector": self.detector.to_dict()}


class NoUsableImagesError(ValueError):
    """The dataset gave no usable face at all: a user error (wrong root, layout or filters), not a crash."""


def _row(record: dict, status: str, reason: str | None = None, **values) -> dict:
    return {**{name: None for name in SCHEMA.names}, **record, "status": status, "reason": reason, **values}


def _encode_jpeg(region: np.ndarray, quality: int) -> bytes:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(region, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return data.tobytes()


def process_records(records: list[dict], detector: FaceDetector, cfg: PreprocessConfig) -> pa.Table:
    """One batch of records -> one row per record (status says what became of it). No Ray in here."""
    rows, pending = [], []
    record_names = ("path", "dataset", "subject", "age", "gender")
    for record in records:
        base = {name: record.get(name) for name in record_names}
        if record.get("status") == "bad_age":
            rows.append(_row(base, "bad_age", f"bad_age: {record.get('age')}"))
            continue
        try:
            pending.append((base, read_image(record["path"], cfg.max_pixels)))
        except ImageError as error:
            rows.append(_row(base, "unreadable", f"{error.reason}: {error}"))
    found_per_image = detector.detect_each([image for _, image in pending]) if pending else []
    for (base, image), found in zip(pending, found_per_image):
        size = {"image_width": image.shape[1], "image_height": image.shape[0]}
        if isinstance(found, Exception):
            rows.append(_row(base, "unreadable", f"detector_error: {found}", **size))
            continue
        faces = found.above(cfg.min_face_score)
        if len(faces) != 1:
            status = "no_face" if len(faces) == 0 else "multi_face"
            rows.append(_row(base, status, f"{status}: {len(faces)} faces", n_faces=len(faces), **size))
            continue
        region, boxes = cut_region(image, faces.boxes[0], cfg.crop)
        rows.append(
            _row(
                base,
                "kept",
                n_faces=1,
                face_box=faces.boxes[0].tolist(),
                landmarks=faces.landmarks[0].reshape(-1).tolist(),
                face_score=float(faces.scores[0]),
                region_jpeg=_encode_jpeg(region, cfg.jpeg_quality),
                region_boxes=boxes.reshape(-1).tolist(),
                **size,
            )
        )
    return pa.Table.from_pylist(rows, schema=SCHEMA)


class RegionMaker:
    """Ray Data actor: holds one MTCNN and turns batches of records into rows. One torch thread per CPU actor."""

    def __init__(self, cfg: PreprocessConfig):
        import torch

        self.cfg = cfg
        self.detector = FaceDetector(cfg.device, cfg.detector)
        if self.detector.device == "cpu":
            torch.set_num_threads(1)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return process_records(batch.to_pylist(), self.detector, self.cfg)


def mark_bad_ages(records: list[dict], cfg: PreprocessConfig, labelled: bool) -> list[dict]:
    """Records with no age or one outside [min_age, max_age] get status bad_age (they skip detection)."""
    marked = []
    for record in records:
        age = record.get("age")
        bad = labelled and (age is None or not math.isfinite(age) or not cfg.min_age <= age <= cfg.max_age)
        marked.append({**record, "status": "bad_age" if bad else None})
    return marked


def _count(filesystem, staging: str) -> tuple[dict, dict]:
    """Rows per status and unreadable rows per reason code, read from the written Parquet (small columns only)."""
    import pyarrow.dataset as pads

    data = pads.dataset(staging, filesystem=filesystem, format="parquet", partitioning="hive")
    table = data.to_table(columns=["status", "reason"])
    counts = {status: 0 for status in STATUSES}
    reasons: dict[str, int] = {}
    for status, reason in zip(table.column("status").to_pylist(), table.column("reason").to_pylist()):
        counts[status] += 1
        if status == "unreadable":
            code = reason.split(":", 1)[0]
            reasons[code] = reasons.get(code, 0) + 1
    return counts, reasons


def _arrange(filesystem, staging: str) -> int:
    """status=kept/ -> faces/, the other partitions -> skipped/; -> bytes of the faces files."""
    for status in STATUSES:
        source = f"{staging}/status={status}"
        if storage.exists(filesystem, source):
            target = f"{staging}/faces" if status == "kept" else f"{staging}/skipped/status={status}"
            storage.move_tree(filesystem, source, target)
    faces = storage.files_under(filesystem, f"{staging}/faces")
    return sum(info.size for info in filesystem.get_file_info(faces))


def preprocess(cfg: PreprocessConfig) -> dict:
    """Run the whole stage; -> the summary (also written to OUT/summary.json). Raises NoUsableImagesError."""
    import ray
    from ray.data import ActorPoolStrategy

    started = time.perf_counter()
    listing = read_dataset(
        cfg.dataset, cfg.root, min_face_score=cfg.mat_min_face_score, drop_second_face=cfg.drop_second_face, csv=cfg.csv
    )
    filesystem, out = storage.resolve(cfg.out)
    storage.check_writable(filesystem, out, cfg.overwrite)
    records = mark_bad_ages(listing.records[: cfg.limit], cfg, listing.labelled)
    if not records:
        raise NoUsableImagesError(f"no images found in {cfg.root} for dataset {cfg.dataset} (reader skipped {listing.skipped})")

    staging = storage.staging_path(out)
    try:
        with ray_runtime():
            device, actors, cpus, gpus = pool_shape(cluster_shape(), cfg.device, cfg.detectors)
            run_cfg = replace(cfg, device=device)
            blocks = max(8 * actors, math.ceil(len(records) / 1000))
            pipeline_started = time.perf_counter()
            (
                ray.data.from_items(records, override_num_blocks=min(blocks, len(records)))
                .map_batches(
                    RegionMaker,
                    fn_constructor_kwargs={"cfg": run_cfg},
                    batch_size=cfg.batch_size,
                    batch_format="pyarrow",
                    compute=ActorPoolStrategy(size=actors),
                    num_cpus=cpus,
                    num_gpus=gpus,
                )
                .write_parquet(staging, filesystem=filesystem, partition_cols=["status"])
            )
            pipeline_s = time.perf_counter() - pipeline_started
        counts, reasons = _count(filesystem, staging)
        face_bytes = _arrange(filesystem, staging)
        elapsed = time.perf_counter() - started
        summary = {
            "dataset": cfg.dataset,
            "root": str(listing.root),
            "out": cfg.out,
            "listed": len(listing.records) + sum(listing.skipped.values()),
            "skipped_by_reader": listing.skipped,
            "seen": len(records),
            **counts,
            "unreadable_reasons": reasons,
            "elapsed_s": round(elapsed, 2),
            "images_per_s": round(len(records) / elapsed, 2),
            "pipeline_s": round(pipeline_s, 2),  # the Ray Data run alone: no listing, Ray start-up or publishing
            "bytes_per_row": round(face_bytes / counts["kept"]) if counts["kept"] else None,
            "device": device,
            "detectors": actors,
            "config": run_cfg.to_dict(),
            "crop": cfg.crop.to_dict(),
            "schema": {name: str(SCHEMA.field(name).type) for name in SCHEMA.names if name != "status"},
            "c3ae_ray_version": __version__,
        }
        if counts["kept"] == 0:
            raise NoUsableImagesError(f"no usable image in {cfg.root}: {count_line(summary)}")
        storage.publish(filesystem, staging, out, summary, cfg.overwrite)
        return summary
    finally:
        storage.delete_tree(filesystem, staging)


def count_line(summary: dict) -> str:
    return ", ".join(f"{name} {summary[name]}" for name in ("seen", *STATUSES))


def format_summary(summary: dict) -> str:
    """The lines the CLI prints at the end."""
    lines = [
        f"preprocessed {summary['dataset']} from {summary['root']} -> {summary['out']}",
        f"  {count_line(summary)}",
        f"  skipped by the dataset reader: {summary['skipped_by_reader'] or 'none'}",
    ]
    if summary["unreadable_reasons"]:
        lines.append(f"  unreadable by reason: {summary['unreadable_reasons']}")
    lines.append(
        f"  {summary['elapsed_s']} s ({summary['pipeline_s']} s in the Ray Data pipeline), "
        f"{summary['images_per_s']} images/s on {summary['detectors']} {summary['device']} detector(s); "
        f"{summary['bytes_per_row']} bytes per face row"
    )
    return "\n".join(lines)
