"""The Parquet face contract between preprocessing and everything that reads it: the schema, the validation
split, and decoding the stored regions. No Ray.

A preprocess output holds `faces/*.parquet` (one row per kept face) and `summary.json` (its crop config among
its counts). Readers take the columns below; the split is a hash of the person (or of the file name where a
dataset has no subjects), so every rerun, resume, evaluation and model card sees the same held-out faces.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import cv2
import numpy as np
import pyarrow as pa

from c3ae_ray import storage
from c3ae_ray.config import UserError, build
from c3ae_ray.crops import N_SCALES, CropConfig
from c3ae_ray.datasets import ETHNICITIES
from c3ae_ray.model import GENDERS, UNKNOWN

STATUSES = ("kept", "no_face", "multi_face", "bad_age", "unreadable")  # what became of each image
SCHEMA = pa.schema(
    [
        ("path", pa.string()),  # source image as listed by the dataset reader
        ("dataset", pa.string()),
        ("subject", pa.string()),  # person id where the dataset has one (FG-NET, IMDB), else null
        ("age", pa.float32()),  # years; null only for an unlabelled folder
        ("gender", pa.string()),  # "female", "male" or null, one convention for every dataset
        ("ethnicity", pa.string()),  # datasets.ETHNICITIES (UTKFace) or null: for fairness tables and auxiliary training
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
TRAINING_COLUMNS = ["path", "subject", "age", "region_jpeg", "region_boxes"]
LABEL_COLUMNS = ["gender", "ethnicity"]  # read where present: outputs of older versions lack ethnicity


def in_validation(key: str, fraction: float) -> bool:
    """Deterministic membership of the validation split: the first 8 bytes of blake2b(key) as a share of 2^64."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def split_key(path: str, subject: str | None) -> str:
    """All faces of one person fall on the same side of the split; without subjects each image is its own key.
    The key is the file name, not the path, so that a split is the same wherever the data lives."""
    return f"subject:{subject}" if subject else f"file:{path.rsplit('/', 1)[-1]}"


def decode_regions(jpegs: list[bytes], paths: list[str], region_size: int) -> np.ndarray:
    """Stored region JPEGs -> (n, R, R, 3) RGB uint8; a region of another size or undecodable bytes is an error."""
    regions = np.empty((len(jpegs), region_size, region_size, 3), dtype=np.uint8)
    for i, (jpeg, path) in enumerate(zip(jpegs, paths)):
        image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        if image is None or image.shape[:2] != (region_size, region_size):
            raise UserError(f"{path}: stored face region is not a {region_size}px JPEG")
        regions[i] = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return regions


def region_boxes(column: list, count: int) -> np.ndarray:
    """The flattened `region_boxes` column -> (n, 3, 4) float32."""
    return np.asarray(column, dtype=np.float32).reshape(count, N_SCALES, 4)


def class_codes(values: list, classes: tuple) -> np.ndarray:
    """Labels -> their index in `classes` (int64), UNKNOWN for a missing or unknown one: the heads' targets."""
    index = {name: i for i, name in enumerate(classes)}
    return np.asarray([index.get(value, UNKNOWN) for value in values], dtype=np.int64)


def decode_faces(batch: pa.Table, split: str | None, val_fraction: float, crop: CropConfig) -> dict:
    """A pyarrow batch of face rows -> numpy columns region (n, R, R, 3) uint8, boxes (n, 3, 4), age (n,),
    gender and ethnicity (n,) class codes (UNKNOWN where the label or the column is missing).

    `split` "train"/"val" keeps that side of the hash split; None keeps every row.
    """
    rows = batch.select([name for name in TRAINING_COLUMNS + LABEL_COLUMNS if name in batch.column_names]).to_pylist()
    if split is not None:
        rows = [r for r in rows if in_validation(split_key(r["path"], r["subject"]), val_fraction) == (split == "val")]
    return {
        "region": decode_regions([r["region_jpeg"] for r in rows], [r["path"] for r in rows], crop.region_size),
        "boxes": region_boxes([r["region_boxes"] for r in rows], len(rows)),
        "age": np.asarray([r["age"] for r in rows], dtype=np.float32),
        "gender": class_codes([r.get("gender") for r in rows], GENDERS),
        "ethnicity": class_codes([r.get("ethnicity") for r in rows], ETHNICITIES),
    }


@dataclass
class FaceData:
    """A preprocessed output as training sees it: where its rows are, its crop geometry, and its labels."""

    location: str
    files: list[str]
    filesystem: object
    crop: CropConfig
    keys: list[str]
    ages: np.ndarray
    summary: dict  # the preprocess summary: dataset, root, counts
    columns: list[str]  # what training reads: TRAINING_COLUMNS and the LABEL_COLUMNS the files have

    def describe(self, mask: np.ndarray | None = None) -> dict:
        ages = self.ages if mask is None else self.ages[mask]
        return {
            "location": self.location,
            "faces": int(len(ages)),
            "age_min": float(ages.min()) if len(ages) else None,
            "age_max": float(ages.max()) if len(ages) else None,
            "age_mean": round(float(ages.mean()), 2) if len(ages) else None,
        }

    def held_out(self, fraction: float) -> np.ndarray:
        """Which rows the hash split holds out for validation."""
        return np.array([in_validation(key, fraction) for key in self.keys], dtype=bool)

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """The given columns, by default those training reads."""
        return self._dataset().to_table(columns=columns or self.columns)

    def _dataset(self):
        import pyarrow.dataset as pads

        return pads.dataset(self.files, filesystem=self.filesystem, format="parquet")


def open_faces(location: str) -> FaceData:
    """Check a preprocess output (complete, labelled) and read its small columns: keys for the split and ages."""
    filesystem, path, summary = storage.require_complete(location)
    if "crop" not in summary or not storage.exists(filesystem, f"{path}/faces"):
        raise UserError(f"{location} is not a `c3ae preprocess` output (no faces/ or crop config)")
    files = [f for f in storage.files_under(filesystem, f"{path}/faces") if f.endswith(".parquet")]
    if not files:
        raise UserError(f"{location} has no face rows")
    data = FaceData(location, files, filesystem, build(CropConfig, summary["crop"], f"{location} crop"), [], np.zeros(0), summary, [])
    present = data._dataset().schema.names
    data.columns = TRAINING_COLUMNS + [name for name in LABEL_COLUMNS if name in present]
    table = data.read(["path", "subject", "age"])
    unlabelled = int(table.column("age").null_count)
    if unlabelled:
        raise UserError(f"{location}: {unlabelled} of {len(table)} faces have no age label; training needs ages")
    data.keys = [split_key(p, s) for p, s in zip(table.column("path").to_pylist(), table.column("subject").to_pylist())]
    data.ages = table.column("age").to_numpy(zero_copy_only=False).astype(np.float32)
    return data


def read_faces(data: FaceData) -> dict:
    """Every face's training columns and labels as plain arrays (evaluation puts them in the object store once)."""
    table = data.read()
    labels = {name: table.column(name).to_pylist() if name in table.column_names else [None] * len(table) for name in LABEL_COLUMNS}
    return {
        **labels,
        "path": table.column("path").to_pylist(),
        "subject": table.column("subject").to_pylist(),
        "age": table.column("age").to_numpy(zero_copy_only=False).astype(np.float32),
        "jpeg": table.column("region_jpeg").to_pylist(),
        "boxes": region_boxes(table.column("region_boxes").to_pylist(), len(table)),
    }
