"""What MTCNN's smallest face costs and buys: speed, faces found and age error of the whole inference path
(decode, detector, crops, bundled model) for each `detector.min_face_size`, against 20 px (facenet-pytorch's
default and ours before 32) in the same run.

    .venv/bin/python benchmarks/min_face_size.py [--sizes 20 32] [--limit 0]

Images: the validation faces of ../shared/data/utkface (the hash split training holds out, so the bundled
model never trained on them; 200 x 200), and the same enlarged to 448 x 448 (the size of FairFace's photos).
One thread, one image per call, as `benchmarks/peer_speed.py`, the settings in turns image by image. Age error
and gender accuracy: the most confident face's answers against the file name's labels. The pyramid starts at
12 / min_face_size of the image, so 32 px does about a third of 20 px's P-Net work; a face under 32 px is
sampled up to 64 px for the model and tells it little.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from c3ae_ray.datasets import read_dataset
from c3ae_ray.detect import DetectorConfig
from c3ae_ray.faces import in_validation, split_key
from c3ae_ray.images import decode_image
from c3ae_ray.inference import Estimator, ImageFaces
from c3ae_ray.model import BUNDLED_MODEL

ROOT = Path(__file__).resolve().parents[1]


def enlarged(paths: list[str], side: int, out: Path) -> list[bytes]:
    out.mkdir(parents=True, exist_ok=True)
    datas = []
    for path in paths:
        target = out / Path(path).name
        if not target.exists():
            Image.open(path).convert("RGB").resize((side, side), Image.BICUBIC).save(target, quality=95)
        datas.append(target.read_bytes())
    return datas


def run(datas: list[bytes], ages: np.ndarray, genders: np.ndarray, sizes: list[int]) -> list[dict]:
    """Every setting on every image, in turns image by image, so that the machine's noise falls on all alike."""
    estimators = [Estimator(BUNDLED_MODEL, device="cpu", detector=DetectorConfig(min_face_size=size)) for size in sizes]
    predicted, seconds = np.full((len(sizes), len(datas)), np.nan), np.zeros(len(sizes))
    female = np.full((len(sizes), len(datas)), np.nan)
    for estimator in estimators:
        estimator.estimate([decode_image(datas[0])])  # warm-up
    for i, data in enumerate(datas):
        for k, estimator in enumerate(estimators):
            started = time.perf_counter()
            [answer] = estimator.estimate([decode_image(data)])
            seconds[k] += time.perf_counter() - started
            if isinstance(answer, ImageFaces) and answer.faces:
                predicted[k, i], female[k, i] = answer.faces[0].age, answer.faces[0].gender == "female"
    found, known = ~np.isnan(predicted), genders != None  # noqa: E711 (an array of labels)
    return [{"rate": len(datas) / seconds[k], "found": found[k], "mae": float(np.abs(predicted[k, found[k]] - ages[found[k]]).mean()),
             "gender": float(np.mean(female[k, found[k] & known] == (genders[found[k] & known] == "female")))}
            for k in range(len(sizes))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20, 32], help="the first is the baseline")
    parser.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--limit", type=int, default=0, help="at most this many validation faces (0: all)")
    parser.add_argument("--work", default="/tmp/c3ae-min-face-size", help="where the enlarged images are written")
    args = parser.parse_args()
    torch.set_num_threads(1)
    listing = read_dataset("utkface", Path(args.shared) / "utkface")
    val = [r for r in listing.records if in_validation(split_key(r["path"], r["subject"]), 0.1)]
    val = val[: args.limit or None]
    ages = np.array([r["age"] for r in val], float)
    genders = np.array([r["gender"] for r in val], object)
    paths = [r["path"] for r in val]
    kinds = {"200x200": [Path(p).read_bytes() for p in paths], "448x448": enlarged(paths, 448, Path(args.work) / "448")}
    print(f"{len(val)} validation faces of utkface, one thread, one image per call, bundled model")
    print(f"{'images':<8} {'min face':>8} {'images/s':>9} {'speed':>6} {'found':>7} {'of base':>8} {'MAE':>6} {'dMAE':>6} {'gender':>7}")
    for kind, datas in kinds.items():
        results = run(datas, ages, genders, args.sizes)
        base = results[0]
        for size, result in zip(args.sizes, results):
            both = result["found"] & base["found"]
            print(f"{kind:<8} {size:>6}px {result['rate']:>9.1f} {result['rate'] / base['rate']:>5.2f}x "
                  f"{result['found'].sum():>7} {both.sum() / base['found'].sum():>8.1%} {result['mae']:>6.2f} "
                  f"{result['mae'] - base['mae']:>+6.2f} {result['gender']:>7.1%}", flush=True)


if __name__ == "__main__":
    main()
