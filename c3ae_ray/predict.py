"""`c3ae predict`: the ages of the faces in a few local photos or videos, in this process, with no Ray and no dataset.

It runs the inference path's `Estimator` (MTCNN, the one crop geometry, C3AE), as the scoring actor does,
one file at a time so that any mix of image sizes works; a video is sampled at `fps` frames per second and each
sampled frame is answered as a photo, with its time. Every file gets a result (a video one per sampled frame):
its faces, "no face", or the reason it could not be read; `--draw` writes a copy of each readable photo (or
sampled frame) with the boxes and ages on it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import cv2
import numpy as np

from c3ae_ray.detect import DetectorConfig
from c3ae_ray.config import check
from c3ae_ray.images import DEFAULT_FPS, DEFAULT_MAX_PIXELS, ImageError, decode_video, is_video, read_file, read_image
from c3ae_ray.inference import Estimator, ImageFaces, ImageFailure
from c3ae_ray.model import BUNDLED_MODEL


@dataclass(frozen=True)
class PredictConfig:
    images: tuple[str, ...]  # local image or video files
    model: str = str(BUNDLED_MODEL)  # a model.pt from `c3ae train` (path or s3://)
    device: str = "auto"
    draw: str | None = None  # write a copy of each photo with boxes and ages into this folder
    json: bool = False  # print the results as JSON
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are refused before decoding
    fps: float = DEFAULT_FPS  # video frames sampled per second
    detector: DetectorConfig = field(default_factory=DetectorConfig)

    def __post_init__(self):
        check(self.fps > 0, f"fps must be positive, got {self.fps}")


FRAMES_PER_CALL = 8  # a video's sampled frames go through the detector this many at a time


def _pictures(path: str, cfg: PredictConfig) -> Iterator[tuple[float | None, np.ndarray | ImageFailure]]:
    """A file's pictures: (None, photo), or a video's (seconds, frame) sampled at cfg.fps as they are decoded;
    a file that cannot be read or decoded gives (None, its failure)."""
    try:
        if is_video(path):
            yield from decode_video(read_file(path), cfg.fps, cfg.max_pixels, Path(path).suffix)
        else:
            yield None, read_image(path, cfg.max_pixels)
    except ImageError as error:  # a video's come before its first frame
        yield None, ImageFailure.of(error)


def predict_files(cfg: PredictConfig) -> list[dict]:
    """One result per image (and per sampled video frame), in order: {path, time_s, faces: [{box, score, age,
    age_low, age_high, gender, p_female}], n_faces, error, drawn, age_range_coverage} (time_s null for a photo;
    the age range, meant to hold age_range_coverage of true ages, null for a model file without one; gender and
    p_female null for a model without a gender head)."""
    estimator = Estimator(cfg.model, cfg.device, cfg.detector)
    if cfg.draw:
        Path(cfg.draw).mkdir(parents=True, exist_ok=True)
    results, drawn_names = [], set()
    age_range = estimator.age_model.age_range
    coverage = None if age_range is None else age_range.coverage
    for path in cfg.images:
        pictures = _pictures(path, cfg)
        while part := list(islice(pictures, FRAMES_PER_CALL)):
            for (time_s, image), answer in zip(part, estimator.estimate([image for _, image in part])):
                result = {"path": str(path), "time_s": time_s, "faces": [], "n_faces": 0, "error": None, "age_range_coverage": coverage}
                results.append(result)
                if isinstance(answer, ImageFailure):
                    result["error"] = answer.reason
                    continue
                _fill(result, answer)
                if cfg.draw:
                    stem = Path(path).stem if time_s is None else f"{Path(path).stem}-{time_s:g}s"
                    result["drawn"] = str(_draw(image, answer, Path(cfg.draw), stem, drawn_names))
    return results


def _fill(result: dict, answer: ImageFaces) -> None:
    result["faces"] = [
        {"box": [round(float(v), 1) for v in face.box], "score": round(face.score, 4), "age": round(face.age, 1),
         "age_low": None if face.age_low is None else round(face.age_low, 1),
         "age_high": None if face.age_high is None else round(face.age_high, 1),
         "gender": face.gender, "p_female": None if face.p_female is None else round(face.p_female, 4)}
        for face in answer.faces
    ]
    result["n_faces"] = answer.n_faces


def _draw(image: np.ndarray, ages: ImageFaces, folder: Path, stem: str, taken: set[str]) -> Path:
    """A JPEG copy of the photo with each face boxed and its age (and F/M) above the box; names never collide in a run."""
    name, n = f"{stem}.jpg", 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}.jpg"
    taken.add(name)
    canvas = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    thickness = max(1, round(max(image.shape[:2]) / 400))
    for face in ages.faces:
        x1, y1, x2, y2 = (int(round(v)) for v in face.box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), (0, 200, 255), thickness)
        label = f"{face.age:.0f}" + ("" if face.age_low is None else f" ({face.age_low:.0f}-{face.age_high:.0f})") \
            + ("" if face.gender is None else f" {face.gender[0].upper()}")
        scale = max(0.5, (x2 - x1) / 120)
        (width, height), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
        top = max(height + 4, y1 - 4)
        cv2.rectangle(canvas, (x1, top - height - 4), (x1 + width + 4, top + 2), (0, 200, 255), -1)
        cv2.putText(canvas, label, (x1 + 2, top), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness, cv2.LINE_AA)
    cv2.imwrite(str(folder / name), canvas, [cv2.IMWRITE_JPEG_QUALITY, 92])
    return folder / name


def format_results(results: list[dict]) -> str:
    """A block per file (per sampled frame of a video: `clip.mp4 at 2.0 s`), then a count line."""
    lines = []
    for result in results:
        name = result["path"] if result.get("time_s") is None else f"{result['path']} at {result['time_s']:g} s"
        if result["error"]:
            lines.append(f"{name}: error: {result['error']}")
            continue
        faces = result["faces"]
        shown = "" if len(faces) == result["n_faces"] else f" (the {len(faces)} most confident shown)"
        lines.append(f"{name}: " + (f"{result['n_faces']} face{'s' * (result['n_faces'] != 1)}{shown}" if faces else "no face"))
        for number, face in enumerate(faces, 1):
            box = ", ".join(f"{v:.0f}" for v in face["box"])
            gender = "" if face["gender"] is None else f"  {face['gender']} (p_female {face['p_female']:.2f})"
            spread = "" if face["age_low"] is None else f" ({face['age_low']:.0f}-{face['age_high']:.0f})"
            lines.append(f"  face {number}: age {face['age']:.1f}{spread}{gender}  box [{box}]  score {face['score']:.3f}")
        if result.get("drawn"):
            lines.append(f"  drawn: {result['drawn']}")
    read = [r for r in results if not r["error"]]
    files, unread = {r["path"] for r in results}, {r["path"] for r in results if r["error"]}
    frames = sum(r.get("time_s") is not None for r in read)
    lines.append(f"{len(files)} file(s): {len(files) - len(unread)} read, {sum(len(r['faces']) for r in read)} face(s)"
                 + (f" in {frames} video frame(s) and {len(read) - frames} photo(s)" if frames else "") + f", {len(unread)} unreadable")
    coverage = next((r["age_range_coverage"] for r in read if r["faces"] and r.get("age_range_coverage")), None)
    if coverage:
        lines.append(f"in brackets: the range that held {100 * coverage:.0f}% of true ages on faces the model never trained on")
    return "\n".join(lines)
