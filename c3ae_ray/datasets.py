"""Read each published face-age layout into records: one dict per image, without decoding or detecting.

Every reader yields the same record, whatever the layout:
`{"path": absolute str, "dataset": str, "subject": str | None, "age": float | None, "gender": "female" |
"male" | None, "ethnicity": one of ETHNICITIES | None}` (ethnicity only where the layout labels it: UTKFace). Readers drop only what the layout itself marks as unusable (a name that is not the
layout's, IMDB-WIKI's own face filters) and count each drop by reason; ages out of range and images that
cannot be read are left for the pipeline to count. Files are not opened or stat-ed one by one, so a listing
of IMDB's 460k entries stays quick and a missing image still shows up as a record.

Layouts:

- `wiki` / `imdb`: `ROOT/wiki.mat` (or `imdb.mat`), the 1x1 struct of the IMDB-WIKI release, with ROOT the
  `wiki_crop` folder or its parent. Without the .mat, the file names `<id>_<YYYY-MM-DD>_<year>.jpg`
  (IMDB's `nm..._rm..._<Y-M-D>_<year>.jpg` too) give subject and age.
- `utkface`: `AGE_GENDER_RACE_DATETIME.jpg[.chip.jpg]`, gender 0 male, 1 female; race 0-4 as ETHNICITIES.
  The release's flawed names are kept: a space or no dot before `jpg`, and three fields instead of four
  (a middle 0/1 is the gender, the race missing; 2-4 is the race, the gender missing).
- `fgnet`: `PPPAaa[suffix].JPG`: subject PPP, age aa.
- `folder`: any images; ages from an optional CSV `path,age[,subject]` (`csv=` or `ROOT/labels.csv`).
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from csv import DictReader
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import scipy.io

from c3ae_ray.config import UserError

DATASETS = ("wiki", "imdb", "utkface", "fgnet", "folder")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
ETHNICITIES = ("white", "black", "asian", "indian", "other")  # UTKFace's race field, 0-4
MAT_FIELDS = ("dob", "photo_taken", "full_path", "gender", "face_score", "second_face_score")
# IMDB-WIKI file names: wiki `10000217_1981-05-05_2009.jpg`, imdb `nm0000001_rm124825600_1899-5-10_1968.jpg`.
IMDB_WIKI_NAME = re.compile(r"([^_]+)(?:_[^_]+)?_(\d{1,4})-(\d{1,2})-(\d{1,2})_(\d{4})\.jpg", re.IGNORECASE)
UTKFACE_NAME = re.compile(r"([0-9]+(?:_[0-9]+)*) ?\.?jpg(?:\.chip\.jpg)?", re.IGNORECASE)
FGNET_NAME = re.compile(r"(\d{3})a(\d{2})[a-z]*\.jpg", re.IGNORECASE)


@dataclass
class Listing:
    dataset: str
    root: str
    records: list[dict]
    skipped: dict[str, int]
    labelled: bool


def read_dataset(
    dataset: str,
    root: str | Path,
    *,
    min_face_score: float | None = 1.0,
    drop_second_face: bool = True,
    csv: str | Path | None = None,
) -> Listing:
    """List the images of `dataset` under `root`, sorted by path.

    `min_face_score` (None: keep all) and `drop_second_face` are IMDB-WIKI's own face filters: entries
    where its detector found no face (score -inf) or a second face are the usual ones left out of training.
    `csv` applies to the folder layout only.
    """
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}: expected one of {', '.join(DATASETS)}")
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise UserError(f"{dataset} root {root} is not a folder")
    if csv is not None and dataset != "folder":
        raise UserError(f"csv= applies to the folder layout only, not to {dataset}")
    skipped: Counter = Counter()
    labelled = True
    if dataset in ("wiki", "imdb"):
        records = _read_imdb_wiki(dataset, Path(root), min_face_score, drop_second_face, skipped)
    elif dataset == "utkface":
        records = _read_utkface(Path(root), skipped)
    elif dataset == "fgnet":
        records = _read_fgnet(Path(root), skipped)
    else:
        records, labelled = _read_folder(Path(root), csv, skipped)
    records.sort(key=lambda record: record["path"])
    return Listing(dataset=dataset, root=root, records=records, skipped=dict(skipped), labelled=labelled)


def _record(path, dataset: str, subject: str | None, age: float | None, gender: str | None, ethnicity: str | None = None) -> dict:
    return {"path": str(path), "dataset": dataset, "subject": subject, "age": age, "gender": gender, "ethnicity": ethnicity}


def _image_files(root: Path) -> list[Path]:
    """Image files under root, recursively; hidden files and folders (`._x.jpg` resource forks) are no images.
    Linked folders are followed, each real folder once: a root of links to several folders reads them all."""
    found, visited = [], set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in visited:
            subfolders[:] = []
            continue
        visited.add(real)
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        found += [
            Path(folder, name)
            for name in names
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
        ]
    return found


def _age_at(birth: datetime, photo_taken) -> float:
    """Age as DEX and SSR-Net compute it: the photo is taken mid-year, so a birthday from July on has not come."""
    return float(int(photo_taken) - birth.year - (birth.month >= 7))


def _birth_from_datenum(dob) -> datetime | None:
    """A Matlab serial date number (day 1 = 1 Jan of year 0, a leap year) as a date; None when invalid."""
    try:
        return datetime.fromordinal(int(dob) - 366)
    except (ValueError, OverflowError):  # NaN, inf, before year 1 or after 9999
        return None


def _read_imdb_wiki(dataset, root: Path, min_face_score, drop_second_face, skipped: Counter) -> list[dict]:
    """From the release's .mat when it is there, from the file names otherwise; root may be the crop folder's parent."""
    if not (root / f"{dataset}.mat").is_file() and (root / f"{dataset}_crop").is_dir():
        root = root / f"{dataset}_crop"
    mat = root / f"{dataset}.mat"
    if mat.is_file():
        return _read_imdb_wiki_mat(dataset, mat, min_face_score, drop_second_face, skipped)
    return _read_imdb_wiki_names(dataset, root, skipped)


def _text(cell) -> str:
    """A string out of a loaded Matlab cell, however deeply scipy wrapped it (an empty cell is '')."""
    while isinstance(cell, np.ndarray):
        if cell.size == 0:
            return ""
        cell = cell.flat[0]
    return str(cell)


def _read_imdb_wiki_mat(dataset, mat: Path, min_face_score, drop_second_face, skipped: Counter) -> list[dict]:
    """The 1x1 struct `wiki`/`imdb` holds one 1xN array (or cell array) per field."""
    loaded = scipy.io.loadmat(str(mat), squeeze_me=False, variable_names=[dataset])
    if dataset not in loaded:
        raise UserError(f"{mat} has no struct variable {dataset!r}")
    struct = loaded[dataset].reshape(-1)[0]
    names = (*MAT_FIELDS, "celeb_id") if dataset == "imdb" else MAT_FIELDS
    missing = [name for name in names if name not in (struct.dtype.names or ())]
    if missing:
        raise UserError(f"{mat}: struct {dataset!r} lacks the fields {', '.join(missing)}")
    fields = {name: struct[name].reshape(-1) for name in names}
    if len({len(values) for values in fields.values()}) != 1:
        raise UserError(f"{mat}: the fields of struct {dataset!r} differ in length")
    base = str(mat.parent)
    records = []
    for i in range(len(fields["dob"])):
        face_score = float(fields["face_score"][i])
        if min_face_score is not None and not face_score >= min_face_score:
            skipped["low_face_score"] += 1
            continue
        if drop_second_face and not math.isnan(float(fields["second_face_score"][i])):
            skipped["second_face"] += 1
            continue
        relative = _text(fields["full_path"][i])
        if dataset == "imdb":
            subject = str(int(fields["celeb_id"][i]))
        else:
            subject = os.path.basename(relative).split("_")[0]
        birth = _birth_from_datenum(fields["dob"][i])
        photo_taken = float(fields["photo_taken"][i])
        age = _age_at(birth, photo_taken) if birth is not None and math.isfinite(photo_taken) else None
        gender = {0.0: "female", 1.0: "male"}.get(float(fields["gender"][i]))
        records.append(_record(os.path.normpath(os.path.join(base, relative)), dataset, subject, age, gender))
    return records


def _read_by_name(root: Path, pattern: re.Pattern, to_record, skipped: Counter, expected: str) -> list[dict]:
    """Layouts whose labels live in file names: each match becomes a record, any other image is a bad_name."""
    records = []
    for path in _image_files(root):
        match = pattern.fullmatch(path.name)
        if match is None:
            skipped["bad_name"] += 1
            continue
        records.append(to_record(path, match))
    if not records:
        raise UserError(f"no {expected} under {root}")
    return records


def _read_imdb_wiki_names(dataset, root: Path, skipped: Counter) -> list[dict]:
    """Birth date and photo year are in each file name; gender is not, and no face filter applies."""

    def to_record(path: Path, match: re.Match) -> dict:
        subject, year, month, day, photo_taken = match.groups()
        try:
            age = _age_at(datetime(int(year), int(month), int(day)), photo_taken)
        except ValueError:  # an impossible date: no age, as for an invalid dob in the .mat
            age = None
        return _record(path, dataset, subject, age, None)

    return _read_by_name(root, IMDB_WIKI_NAME, to_record, skipped, f"{dataset}.mat and no <id>_<YYYY-MM-DD>_<year>.jpg images")


def _read_utkface(root: Path, skipped: Counter) -> list[dict]:
    """Names carry AGE_GENDER_RACE_DATETIME; a few real ones lack the race or the gender (see the module doc)."""
    genders, races = {"0": "male", "1": "female"}, dict(enumerate(ETHNICITIES))

    def to_record(path: Path, match: re.Match) -> dict:
        fields = match[1].split("_")
        gender = ethnicity = None
        if len(fields) == 4:
            gender, ethnicity = genders.get(fields[1]), races.get(int(fields[2]))
        elif len(fields) == 3:
            gender, ethnicity = genders.get(fields[1]), None if fields[1] in genders else races.get(int(fields[1]))
        return _record(path, "utkface", None, float(fields[0]), gender, ethnicity)

    return _read_by_name(root, UTKFACE_NAME, to_record, skipped, "UTKFace images (AGE_GENDER_RACE_DATETIME.jpg)")


def _read_fgnet(root: Path, skipped: Counter) -> list[dict]:
    """Names `PPPAaa[suffix].JPG` carry the subject and the age; their case varies across copies of FG-NET."""

    def to_record(path: Path, match: re.Match) -> dict:
        return _record(path, "fgnet", match[1], float(match[2]), None)

    return _read_by_name(root, FGNET_NAME, to_record, skipped, "FG-NET images (PPPAaa.JPG, e.g. 001A02.JPG)")


def _read_folder(root: Path, csv, skipped: Counter) -> tuple[list[dict], bool]:
    """Ages come only from a CSV; without one every image is listed unlabelled, for scoring."""
    if csv is None and (root / "labels.csv").is_file():
        csv = root / "labels.csv"
    if csv is None:
        records = [_record(path, "folder", None, None, None) for path in _image_files(root)]
        if not records:
            raise UserError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root}")
        return records, False
    return _read_labels_csv(root, Path(csv), skipped), True


def _read_labels_csv(root: Path, csv: Path, skipped: Counter) -> list[dict]:
    """Rows `path,age[,subject]`, paths relative to root or absolute; an age that is no number is None."""
    if not csv.is_file():
        raise UserError(f"labels CSV {csv} does not exist")
    with open(csv, newline="", encoding="utf-8-sig") as handle:
        reader = DictReader(handle)
        columns = [name.strip() for name in reader.fieldnames or ()]
        if "path" not in columns or "age" not in columns:
            raise UserError(f"labels CSV {csv} needs the columns path and age, has {columns}")
        reader.fieldnames = columns
        records = []
        for row in reader:
            path = (row["path"] or "").strip()
            if not path:
                skipped["no_path"] += 1
                continue
            subject = (row.get("subject") or "").strip() or None
            records.append(_record(os.path.normpath(root / path), "folder", subject, _number(row["age"]), None))
    if not records:
        raise UserError(f"labels CSV {csv} lists no image")
    return records


def _number(text) -> float | None:
    """A finite float, or None for an empty cell, a word or NaN."""
    try:
        age = float(text)
    except (TypeError, ValueError):
        return None
    return age if math.isfinite(age) else None
