"""MTCNN detection speed, one thread: our `_detect_batch` (the pyramid's levels and R-Net's and O-Net's inputs
for all boxes at once, from a summed-area table) against facenet-pytorch's `MTCNN.detect` (one `interpolate` per
level and per box), the same PyTorch networks (facenet-pytorch's weights; `c3ae` runs them in ONNX Runtime on
CPUs, which this leaves out) and settings.

    .venv/bin/python benchmarks/detector_resampling.py [--images 400] [--batch 16] [--rounds 3] [--side 448]

On the first N images (by name) of ../shared/data/utkface (200 x 200; --side: enlarged to side x side),
decoded beforehand; rounds alternate stock, ours, stock, ours... Prints images/s of each round and the ratio
of the medians.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from c3ae_ray.detect import FaceDetector, Networks, _detect_batch
from c3ae_ray.images import decode_image

UTKFACE = Path(__file__).resolve().parents[2] / "shared" / "data" / "utkface"


def images_per_second(detect, batches: list[np.ndarray]) -> float:
    start = time.perf_counter()
    for batch in batches:
        detect(batch)
    return sum(map(len, batches)) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--side", type=int, default=None, help="enlarge the images to side x side (bicubic)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    images = [decode_image(path.read_bytes()) for path in sorted(UTKFACE.glob("*.jpg"))[: args.images]]
    if args.side:
        images = [cv2.resize(image, (args.side, args.side), interpolation=cv2.INTER_CUBIC) for image in images]
    batches = [np.stack(images[i : i + args.batch]) for i in range(0, len(images), args.batch)]
    from facenet_pytorch import MTCNN

    detector = FaceDetector("cpu")
    stock = MTCNN(keep_all=True, select_largest=False, min_face_size=detector.cfg.min_face_size,
                  thresholds=list(detector.cfg.thresholds), factor=detector.cfg.factor, device="cpu")
    torch_networks = Networks.pytorch(detector.mtcnn, "cpu")
    contenders = {
        "facenet": lambda batch: stock.detect(batch, landmarks=True),
        "batched": lambda batch: _detect_batch(detector.cfg, torch_networks, batch),
    }
    for detect in contenders.values():
        detect(batches[0])  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(args.rounds):
        for name, detect in contenders.items():
            rates[name].append(images_per_second(detect, batches))
            print(f"round {round_ + 1} {name:8s} {rates[name][-1]:6.1f} images/s", flush=True)
    old, new = statistics.median(rates["facenet"]), statistics.median(rates["batched"])
    print(f"{len(images)} images of {images[0].shape[1]}x{images[0].shape[0]}, batches of {args.batch}: facenet {old:.1f}, batched {new:.1f} images/s, "
          f"ratio {new / old:.2f}x (medians of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
