"""Preprocessing: a face-age dataset in its published layout -> Parquet that training reads without ever
touching the raw images or the detector again.

It runs the batch skeleton (`c3ae_ray.batch`): the dataset's records -> read tasks -> an actor pool where
each actor decodes, detects (MTCNN) and cuts the face region of a batch of images with the detector half of
the inference path (`inference.FaceFinder`) -> Parquet, partitioned by status. The output folder:

    OUT/faces/*.parquet      one row per kept face (exactly one face over --min-face-score, age in range)
    OUT/skipped/status=*/    one row per image not kept: no_face, multi_face, bad_age, unreadable (+ reason)
    OUT/summary.json         counts, timing, configs and schema; written last (readers require it)

The columns are the face contract of `c3ae_ray.faces`. A row's `region_jpeg` is `crops.cut_region`'s output,
JPEG-encoded; `region_boxes` holds the three context boxes in its coordinates. Training cuts the 64x64 crops
from it (with the paper's random box shift) by the same geometry that scoring and serving use on full images.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import cv2
import numpy as np
import pyarrow as pa

from c3ae_ray import __version__, storage
from c3ae_ray.batch import PROGRESS_INTERVAL_S, BatchJob, PoolWorker, decoded_inputs, filesystems_for, run_batch, status_counts
from c3ae_ray.config import UserError, check, to_dict
from c3ae_ray.crops import CropConfig
from c3ae_ray.datasets import read_dataset
from c3ae_ray.detect import DetectorConfig
from c3ae_ray.faces import SCHEMA, STATUSES
from c3ae_ray.images import DEFAULT_MAX_PIXELS
from c3ae_ray.inference import FaceFinder, ImageFailure

RECORD_COLUMNS = ("path", "dataset", "subject", "age", "gender", "ethnicity")


@dataclass(frozen=True)
class PreprocessConfig:
    dataset: str  # wiki, imdb, utkface, fgnet or folder
    root: str  # the dataset's folder as published
    out: str  # output folder: a local path or s3://bucket/prefix
    csv: str | None = None  # folder layout: labels CSV (path,age[,subject]); default ROOT/labels.csv
    device: str = "auto"
    detectors: int | None = None  # MTCNN actors; default one per CPU, or per GPU
    batch_size: int = 32  # images per detector batch
    limit: int | None = None  # only the first N records (sorted by path)
    min_age: float = 0.0
    max_age: float = 120.0
    mat_min_face_score: float | None = 1.0  # IMDB-WIKI's own face_score filter (None: off)
    drop_second_face: bool = True  # IMDB-WIKI: drop images where the dataset saw a second face
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are skipped as unreadable, before decoding
    jpeg_quality: int = 95
    overwrite: bool = False  # replace an existing out once the new one is complete
    progress_s: float = PROGRESS_INTERVAL_S  # seconds between progress lines (0: none)
    crop: CropConfig = field(default_factory=CropConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)

    def __post_init__(self):
        check(self.batch_size >= 1 and (self.limit is None or self.limit >= 1), "batch_size and limit must be at least 1")
        check(self.min_age <= self.max_age, f"min_age {self.min_age} is over max_age {self.max_age}")
        check(1 <= self.jpeg_quality <= 100, f"jpeg_quality must be 1 to 100, got {self.jpeg_quality}")
        check(self.progress_s >= 0, f"progress_s must not be negative, got {self.progress_s}")


class NoUsableImagesError(UserError):
    """The dataset gave no usable face at all: a user error (wrong root, layout or filters), not a crash."""


def _row(record: dict, status: str, reason: str | None = None, **values) -> dict:
    return {**{name: None for name in SCHEMA.names}, **{k: record[k] for k in RECORD_COLUMNS}, "status": status, "reason": reason, **values}


def _encode_jpeg(region: np.ndarray, quality: int) -> bytes:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(region, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return data.tobytes()


class RegionMaker(PoolWorker):
    """Read records -> one row per record (status says what became of it)."""

    def __init__(self, cfg: PreprocessConfig, device: str, tally=None):
        super().__init__(device, tally)
        self.cfg = cfg
        self.finder = FaceFinder(cfg.crop, device, cfg.detector)

    def rows(self, records: list[dict]) -> pa.Table:
        found = self.finder.find(decoded_inputs(records, self.cfg.max_pixels), max_faces=1)
        return pa.Table.from_pylist([self._row(record, answer) for record, answer in zip(records, found)], schema=SCHEMA)

    def _row(self, record: dict, answer) -> dict:
        if isinstance(answer, ImageFailure):
            return _row(record, "bad_age" if answer.code == "bad_age" else "unreadable", answer.reason)
        size = {"image_width": answer.width, "image_height": answer.height, "n_faces": len(answer.faces)}
        if len(answer.faces) != 1:
            status = "no_face" if len(answer.faces) == 0 else "multi_face"
            return _row(record, status, f"{status}: {len(answer.faces)} faces", **size)
        faces = answer.faces
        return _row(
            record, "kept", **size,
            face_box=faces.boxes[0].tolist(),
            landmarks=faces.landmarks[0].reshape(-1).tolist(),
            face_score=float(faces.scores[0]),
            region_jpeg=_encode_jpeg(answer.regions[0], self.cfg.jpeg_quality),
            region_boxes=answer.boxes[0].reshape(-1).tolist(),
        )


def mark_bad_ages(records: list[dict], cfg: PreprocessConfig, labelled: bool) -> list[dict]:
    """Records with no age or one outside [min_age, max_age] get the error bad_age (they are never read)."""
    marked = []
    for record in records:
        age = record.get("age")
        bad = labelled and (age is None or not math.isfinite(age) or not cfg.min_age <= age <= cfg.max_age)
        marked.append({**{k: record.get(k) for k in RECORD_COLUMNS}, "error": f"bad_age: {age}" if bad else None})
    return marked


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
    started = time.perf_counter()
    listing = read_dataset(cfg.dataset, cfg.root, min_face_score=cfg.mat_min_face_score, drop_second_face=cfg.drop_second_face, csv=cfg.csv)
    records = mark_bad_ages(listing.records[: cfg.limit], cfg, listing.labelled)
    if not records:
        raise NoUsableImagesError(f"no images found in {cfg.root} for dataset {cfg.dataset} (reader skipped {listing.skipped})")

    def summarize(filesystem, staging: str, run: dict) -> dict:
        counts, reasons, _ = status_counts(filesystem, staging, "unreadable", partitioning="hive")
        face_bytes = _arrange(filesystem, staging)
        elapsed = time.perf_counter() - started
        summary = {
            "dataset": cfg.dataset, "root": str(listing.root), "out": cfg.out,
            "listed": len(listing.records) + sum(listing.skipped.values()), "skipped_by_reader": listing.skipped,
            "seen": len(records), **{status: counts.get(status, 0) for status in STATUSES}, "unreadable_reasons": reasons,
            "elapsed_s": round(elapsed, 2), "images_per_s": round(len(records) / elapsed, 2),
            "pipeline_s": run["pipeline_s"],  # the Ray Data run alone: no listing, Ray start-up or publishing
            "bytes_per_row": round(face_bytes / counts["kept"]) if counts.get("kept") else None,
            "device": run["device"], "detectors": run["actors"],
            "config": to_dict(replace(cfg, device=run["device"])), "crop": to_dict(cfg.crop),
            "schema": {name: str(SCHEMA.field(name).type) for name in SCHEMA.names if name != "status"},
            "c3ae_ray_version": __version__,
        }
        if not summary["kept"]:
            raise NoUsableImagesError(f"no usable image in {cfg.root}: {count_line(summary)}")
        return summary

    job = BatchJob(records, RegionMaker, {"cfg": cfg}, cfg.out, cfg.overwrite, cfg.device, cfg.detectors, cfg.batch_size,
                   partition_cols=["status"], filesystems=filesystems_for([r["path"] for r in records]),
                   name="preprocess", progress_s=cfg.progress_s)
    return run_batch(job, summarize)


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
