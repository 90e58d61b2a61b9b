"""Builders of each published dataset layout, made at test time from real UTKFace faces.

The faces come from ../shared/data/utkface and are copied into a temporary folder, never into the repo
(licence). Every builder is deterministic (sorted inputs, fixed choices), writes tens of small files, and
returns what `c3ae_ray.datasets.read_dataset` must list for it, so tests compare whole records.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from datetime import date
from pathlib import Path
from typing import Callable

import numpy as np
import scipy.io
from PIL import Image


def record(path, dataset: str, subject=None, age=None, gender=None, ethnicity=None) -> dict:
    """A record as read_dataset returns it."""
    return {"path": str(path), "dataset": dataset, "subject": subject, "age": age, "gender": gender, "ethnicity": ethnicity}


def by_path(records: list[dict]) -> list[dict]:
    return sorted(records, key=lambda r: r["path"])


def utk_faces(utk_dir: Path, n: int, *, max_age: int = 200) -> list[Path]:
    """n well-formed UTKFace files (four name fields, age <= max_age), evenly spread over the sorted folder."""
    faces = [
        path
        for path in sorted(Path(utk_dir).iterdir())
        if len(path.name.split("_")) == 4 and int(path.name.split("_")[0]) <= max_age
    ]
    step = max(1, len(faces) // n)
    picked = faces[::step][:n]
    assert len(picked) == n, f"only {len(picked)} UTKFace faces under {utk_dir}"
    return picked


def utk_age(face: Path) -> int:
    return int(face.name.split("_")[0])


def utk_gender(face: Path) -> str:
    """UTKFace's own convention: 0 male, 1 female."""
    return {"0": "male", "1": "female"}[face.name.split("_")[1]]


def utk_ethnicity(face: Path) -> str:
    """UTKFace's race field: 0 White, 1 Black, 2 Asian, 3 Indian, 4 Others (the shared README)."""
    return ["white", "black", "asian", "indian", "other"][int(face.name.split("_")[2])]


def _copy(face: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(face, target)
    return target


def _cells(values) -> np.ndarray:
    """A 1-D object array, which savemat writes as a 1xN cell array (np.array would nest equal-shaped items)."""
    cells = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        cells[i] = value
    return cells


def write_imdb_wiki_mat(path: Path, dataset: str, entries: list[dict], celeb_names: list[str] | None = None) -> Path:
    """Write `entries` as the release's 1x1 struct `wiki`/`imdb` of 1xN fields (MATLAB v5, as published).

    Each entry needs dob, photo_taken, full_path, gender, face_score and second_face_score; name, celeb_id
    and face_location get defaults. IMDB also gets celeb_names (indexed by celeb_id, 1-based).
    """
    struct = {
        "dob": np.array([e["dob"] for e in entries], dtype=np.float64),
        "photo_taken": np.array([e["photo_taken"] for e in entries], dtype=np.uint16),
        "full_path": _cells([e["full_path"] for e in entries]),
        "gender": np.array([e["gender"] for e in entries], dtype=np.float64),
        "name": _cells([e.get("name", "") for e in entries]),
        "face_location": _cells([np.array([[10.0, 12.0, 150.0, 160.0]]) for _ in entries]),
        "face_score": np.array([e["face_score"] for e in entries], dtype=np.float64),
        "second_face_score": np.array([e["second_face_score"] for e in entries], dtype=np.float64),
    }
    if dataset == "imdb":
        struct["celeb_names"] = _cells(celeb_names or [])
        struct["celeb_id"] = np.array([e.get("celeb_id", 1) for e in entries], dtype=np.float64)
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), {dataset: struct}, format="5", oned_as="row")
    return path


def datenum(day: date) -> float:
    """Matlab serial date number of a date (what IMDB-WIKI stores as dob)."""
    return float(day.toordinal() + 366)


# Entry roles by index in make_wiki/make_imdb: which filter or corner case each one exercises.
NO_FACE, SECOND_FACE, MISSING_FILE, NO_GENDER, LOW_SCORE, BAD_DOB = 1, 2, 3, 4, 5, 6


def _make_imdb_wiki(dataset: str, root: Path, utk_dir: Path, n: int) -> dict:
    """Shared by make_wiki and make_imdb; see make_wiki."""
    assert n > BAD_DOB, f"n must be at least {BAD_DOB + 1}"
    crop = Path(root) / f"{dataset}_crop"
    entries, celeb_names = [], []
    for i, face in enumerate(utk_faces(utk_dir, n, max_age=90)):
        age = float(utk_age(face))
        month, day = [(1, 1), (6, 30), (7, 1), (12, 31)][i % 4]  # either side of the July boundary
        photo_taken = 2000 + i % 15
        birth = date(photo_taken - int(age) - (month >= 7), month, day)
        dob = datenum(birth) + (0.5 if i % 2 else 0.0)  # a fraction of a day must not change the date
        if i == BAD_DOB:
            dob, age = 0.0, None  # before year 1: no date at all
        # wiki pads month and day, IMDB does not; an invalid dob has an impossible date in the name too.
        if dataset == "wiki":
            born = "0000-01-01" if i == BAD_DOB else f"{birth.year:04d}-{birth.month:02d}-{birth.day:02d}"
            subject = fallback_subject = f"{10000000 + 7919 * i}"
            name = f"{subject}_{born}_{photo_taken}.jpg"
        else:
            born = "0-1-1" if i == BAD_DOB else f"{birth.year}-{birth.month}-{birth.day}"
            celeb_id = 1 + i // 3  # three photos per celebrity
            if celeb_id > len(celeb_names):
                celeb_names.append(f"Celebrity {celeb_id}")
            subject, fallback_subject = str(celeb_id), f"nm{celeb_id:07d}"
            name = f"{fallback_subject}_rm{100000 + i}_{born}_{photo_taken}.jpg"
        full_path = f"{name.split('_')[0][-2:]}/{name}"
        path = crop / full_path
        if i != MISSING_FILE:
            _copy(face, path)
        gender = utk_gender(face)
        entries.append(
            {
                "dob": dob,
                "photo_taken": photo_taken,
                "full_path": full_path,
                "gender": math.nan if i == NO_GENDER else (0.0 if gender == "female" else 1.0),  # 0 is female here
                "name": celeb_names[-1] if dataset == "imdb" else f"Person {i}",
                "celeb_id": int(subject) if dataset == "imdb" else None,
                "face_score": {NO_FACE: -math.inf, LOW_SCORE: 0.5}.get(i, 1.0 + 0.37 * i),
                "second_face_score": 2.1 if i == SECOND_FACE else math.nan,
                "on_disk": i != MISSING_FILE,
                "record": record(path, dataset, subject, age, None if i == NO_GENDER else gender),
                "fallback": record(path, dataset, fallback_subject, age),
            }
        )
    mat = write_imdb_wiki_mat(crop / f"{dataset}.mat", dataset, entries, celeb_names)
    _copy(utk_faces(utk_dir, 1)[0], crop / "00" / "portrait.jpg")  # not in the .mat; no IMDB-WIKI name
    kept = [e for e in entries if e["face_score"] >= 1.0 and math.isnan(e["second_face_score"])]
    return {
        "root": crop,
        "mat": mat,
        "entries": entries,
        "records": by_path([e["record"] for e in kept]),
        "skipped": {"low_face_score": 2, "second_face": 1},
        "unfiltered": by_path([e["record"] for e in entries]),
        "missing": str(crop / entries[MISSING_FILE]["full_path"]),
        "fallback_records": by_path([e["fallback"] for e in entries if e["on_disk"]]),
        "fallback_skipped": {"bad_name": 1},
    }


def make_wiki(root: Path, utk_dir: Path, n: int = 12) -> dict:
    """`root/wiki_crop/wiki.mat` plus `root/wiki_crop/NN/<id>_<YYYY-MM-DD>_<year>.jpg`, one per UTKFace face.

    dob and photo_taken give each entry its face's UTKFace age by the DEX rule; births alternate either
    side of 1 July. Entry 1 has no face (score -inf), 2 a second face, 3 no file on disk, 4 no gender,
    5 a face score of 0.5, 6 an invalid dob (age None); `00/portrait.jpg` is an image outside the .mat.
    Returns root (the wiki_crop folder), mat, entries (each with its mat fields, `record` and `fallback`),
    records/skipped under the default filters, unfiltered (no filter), missing (the absent file's path),
    fallback_records/fallback_skipped (what the file names alone give once the .mat is removed).
    """
    return _make_imdb_wiki("wiki", root, utk_dir, n)


def make_imdb(root: Path, utk_dir: Path, n: int = 12) -> dict:
    """Like make_wiki, in `root/imdb_crop` with `imdb.mat` (celeb_names, celeb_id: three photos per id) and
    IMDB's names `nm<celeb>_rm<photo>_<Y-M-D>_<year>.jpg`; subject is celeb_id, or `nm<celeb>` by name."""
    return _make_imdb_wiki("imdb", root, utk_dir, n)


def make_utkface(root: Path, utk_dir: Path, n: int = 12) -> dict:
    """n UTKFace files under root (half in `part2/`, some named `.JPG.CHIP.JPG` or plain `.jpg`), plus
    five flawed names that are kept, two bad names, a hidden file and a text file (ignored). Returns root,
    records, skipped."""
    root = Path(root)
    records = []
    for i, face in enumerate(utk_faces(utk_dir, n)):
        stem = face.name[: -len(".jpg.chip.jpg")]
        name = [face.name, f"{stem}.JPG.CHIP.JPG", f"{stem}.jpg"][i % 3]
        path = _copy(face, root / ("part2" if i % 2 else "") / name)
        records.append(record(path, "utkface", None, float(utk_age(face)), utk_gender(face), utk_ethnicity(face)))
    spare = utk_faces(utk_dir, 1)[0]
    # The release's flawed names (the shared README): no race field, no gender field, gender 2, a space, no dot.
    for name, age, gender, ethnicity in [("61_1_20170109142408075.jpg.chip.jpg", 61.0, "female", None),
                                         ("61_3_20170109150557335.jpg.chip.jpg", 61.0, None, "indian"),
                                         ("30_2_0_20170103182359125.jpg", 30.0, None, "white"),
                                         ("24_0_1_20170116220224657 .jpg.chip.jpg", 24.0, "male", "black"),
                                         ("55_0_0_20170116232725357jpg.chip.jpg", 55.0, "male", "white")]:
        records.append(record(_copy(spare, root / name), "utkface", None, age, gender, ethnicity))
    for name in ["face.jpg", "x_0_0_20170103182359125.jpg.chip.jpg", "._25_0_0_20170103182359125.jpg.chip.jpg"]:
        _copy(spare, root / name)
    (root / "README.txt").write_text("UTKFace subset\n")
    return {"root": root, "records": by_path(records), "skipped": {"bad_name": 2}}


def make_fgnet(root: Path, utk_dir: Path, subjects: int = 3, per_subject: int = 4) -> dict:
    """FG-NET's `root/images/PPPAaa[suffix].JPG` for subjects 001, 041, 081, ... with mixed-case names and
    suffixes, ages (< 70, distinct per subject) from the copied faces; `points/*.pts` files, which are no
    images, and two image files with other names (counted bad_name). Returns root, records, skipped."""
    root = Path(root)
    faces = iter(utk_faces(utk_dir, subjects * per_subject * 3, max_age=69))
    patterns = ["{s}A{a:02d}.JPG", "{s}a{a:02d}b.jpg", "{s}A{a:02d}.jpg", "{s}a{a:02d}A.JPG"]
    (root / "points").mkdir(parents=True, exist_ok=True)
    records = []
    for k in range(subjects):
        subject, ages = f"{1 + 40 * k:03d}", set()
        while len(ages) < per_subject:
            face = next(faces)
            if utk_age(face) in ages:
                continue
            ages.add(utk_age(face))
            name = patterns[len(ages) % len(patterns)].format(s=subject, a=utk_age(face))
            path = _copy(face, root / "images" / name)
            records.append(record(path, "fgnet", subject, float(utk_age(face))))
            (root / "points" / f"{Path(name).stem.lower()}.pts").write_text("version: 1\nn_points: 0\n{\n}\n")
    _copy(utk_faces(utk_dir, 1)[0], root / "images" / "001A2.JPG")
    _copy(utk_faces(utk_dir, 1)[0], root / "images" / "cover.jpg")
    return {"root": root, "records": by_path(records), "skipped": {"bad_name": 2}}


def make_folder(root: Path, utk_dir: Path, n: int = 8, labels: str | None = None) -> dict:
    """root/photos (half in photos/more) of n faces as jpg, JPEG, png, bmp, webp, tif, TIFF, plus a text file.

    labels: None, no CSV (unlabelled, every image listed); "root", `root/labels.csv` with `path,age,subject`
    (relative paths, one absolute, one age "unknown", one empty subject, one row for an absent image, the
    last image left out); "outside", a CSV beside root with `path,age` only, to pass as csv=.
    Returns root, records, labelled, csv (the CSV path or None).
    """
    root = Path(root)
    extensions = [".jpg", ".JPEG", ".png", ".bmp", ".webp", ".tif", ".TIFF"]
    images = []
    for i, face in enumerate(utk_faces(utk_dir, n)):
        path = root / "photos" / ("more" if i % 2 else "") / f"face{i:02d}{extensions[i % len(extensions)]}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() in (".jpg", ".jpeg"):
            _copy(face, path)
        else:
            Image.open(face).save(path)
        images.append((path, face))
    (root / "photos" / "notes.txt").write_text("not an image\n")
    if labels is None:
        records = by_path([record(path, "folder") for path, _ in images])
        return {"root": root, "records": records, "labelled": False, "csv": None}
    rows, records = [], []
    for i, (path, face) in enumerate(images[:-1]):
        written = str(path) if i == 1 else path.relative_to(root).as_posix()
        age_text, age = ("unknown", None) if i == 2 else (str(utk_age(face)), float(utk_age(face)))
        subject = None if labels == "outside" or i == 3 else f"s{i % 3}"
        rows.append([written, age_text, subject or ""])
        records.append(record(path, "folder", subject, age))
    rows.append(["photos/gone.jpg", "40", "s9"])
    records.append(record(root / "photos" / "gone.jpg", "folder", None if labels == "outside" else "s9", 40.0))
    if labels == "root":
        csv = root / "labels.csv"
        lines = ["path,age,subject"] + [",".join(row) for row in rows]
    else:
        csv = root.parent / f"{root.name}_labels.csv"
        lines = ["path,age"] + [",".join(row[:2]) for row in rows]
    csv.write_text("\n".join(lines) + "\n")
    return {"root": root, "records": by_path(records), "labelled": True, "csv": csv}


def kill_ray_process(ray_session, title: str) -> int | None:
    """SIGKILL one process of this session's raylet whose title starts with `title` (Ray names its worker
    processes `ray::Class.method`), never one of another Ray on the machine. -> its pid, or None if none runs."""
    return kill_descendant(ray_session._private.worker._global_node.all_processes["raylet"][0].process.pid, title)


def _processes() -> dict[int, tuple[int, bytes]]:
    """pid -> (parent pid, command line) of every process now."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
                table[int(entry.name)] = (int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]), cmdline)
            except (OSError, IndexError, ValueError):
                continue
    return table


def descendants(root: int) -> dict[int, bytes]:
    """pid -> command line of every process below `root` (a Ray started by a command: its raylet's workers)."""
    table, found, frontier = _processes(), {}, {root}
    while frontier:
        children = {pid for pid, (parent, _) in table.items() if parent in frontier and pid not in found}
        found.update({pid: table[pid][1] for pid in children})
        frontier = children
    return found


def alive(pids) -> set[int]:
    """Those of `pids` still running (a zombie, dead but not yet reaped, is not)."""
    running = set()
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                running.add(pid)
        except (OSError, IndexError):
            pass
    return running


def kill_descendant(root: int, title: str) -> int | None:
    """SIGKILL one process below `root` whose title starts with `title`. -> its pid, or None if none runs."""
    for pid, cmdline in descendants(root).items():
        if cmdline.startswith(title.encode()):
            os.kill(pid, signal.SIGKILL)
            return pid
    return None


def fault_mid_run(capsys, stage: Callable[[], dict], fault: Callable[[], object]) -> dict:
    """Run a batch stage (its progress lines on, a short interval) in a thread, call `fault` once a progress line
    says some but not all inputs are done, and wait for the stage. -> {"summary": ...} or {"error": ...}, and
    "fault": what `fault` returned. Fails if the stage ends before the fault or does not end after it."""
    outcome = {}

    def go():
        try:
            outcome["summary"] = stage()
        except BaseException as error:  # the test looks at it
            outcome["error"] = error

    thread = threading.Thread(target=go)
    thread.start()
    printed, deadline = "", time.monotonic() + 300
    while True:
        printed += capsys.readouterr().out
        lines = [(int(m[1].replace(",", "")), int(m[2].replace(",", ""))) for m in re.finditer(r"([\d,]+) of ([\d,]+) images", printed)]
        if lines and 0 < lines[-1][0] < lines[-1][1]:
            break
        assert thread.is_alive() and time.monotonic() < deadline, f"the stage ended or stalled before any progress: {outcome}"
        time.sleep(0.05)
    assert thread.is_alive(), "the stage ended before the fault"
    outcome["fault"] = fault()
    thread.join(timeout=600)
    assert not thread.is_alive(), "the stage did not end after the fault"
    return outcome


def kill_a_pool_actor_mid_run(ray_session, capsys, stage: Callable[[], dict], title: str = "ray::MapWorker") -> dict:
    """`fault_mid_run` with SIGKILL to one of the stage's pool actors. -> the stage's summary."""
    outcome = fault_mid_run(capsys, stage, lambda: kill_ray_process(ray_session, title))
    assert outcome["fault"], f"no {title} process found"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["summary"]


@contextlib.contextmanager
def small_disk(path: Path, kilobytes: int = 256):
    """A tmpfs of that size mounted at `path` (a disk that fills up or turns read-only on demand: `mount -o
    remount,ro`), unmounted afterwards. Needs root, as the test machines run."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kilobytes}k", "tmpfs", str(path)], check=True, capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def fill(disk: Path) -> Path:
    """Write one file until the disk is full. -> the file (delete it to free the disk)."""
    filler = disk / "filler"
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(descriptor, b"\0" * 4096):
            pass
    except OSError:  # ENOSPC: full
        pass
    finally:
        os.close(descriptor)
    return filler


def free_port() -> int:
    """A loopback TCP port nobody listens on now."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_clip(path: Path, photos: list[Path], seconds_each: float = 1.5, fps: int = 10, side: int = 320) -> Path:
    """A video (MPEG-4 part 2 in an .mp4, OpenCV's writer) that shows each photo in turn for `seconds_each`
    seconds at `fps` frames per second, every photo resized to side x side (the codec needs even sides)."""
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (side, side))
    assert writer.isOpened(), "OpenCV cannot write MPEG-4 video here"
    for photo in photos:
        frame = cv2.resize(cv2.imread(str(photo)), (side, side))
        for _ in range(round(seconds_each * fps)):
            writer.write(frame)
    writer.release()
    return path
