"""Issue 21's fourth goal, for a machine with a GPU: MTCNN images/s on batches of 200x200 and 640x480 images,
and training samples/s, on the GPU, each against the same work on this machine's CPU in the same run.

    .venv/bin/python benchmarks/gpu.py [--images 512] [--batch 32] [--train-samples 8192] [--cpu-share 8]

- MTCNN: `detect.FaceDetector` (facenet-pytorch's networks on the GPU between our numpy glue; ONNX Runtime with
  every CPU thread as the baseline) on the first N shared UTKFace faces (200x200) and the same faces enlarged to
  480x480 and mirrored out to 640x480, in batches; decoded beforehand. Prints images/s and the share of images
  with a face, for each device.
- Training: `loop.train_epoch` (the step `c3ae train` runs: `crop_batch` with augmentation, C3AE, the loss,
  Adam; bfloat16 autocast where the device supports it) on regions cut from the same faces with
  `crops.cut_region`, their ages from the file names, batches of --train-batch. Samples/s after a warm-up epoch.
The CPU baseline runs on 1/--cpu-share of the work (it is many times slower); on a machine without a GPU the
script runs the CPU half only, with a note, so it can be checked anywhere.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from c3ae_ray.crops import CropConfig, cut_region
from c3ae_ray.detect import FaceDetector
from c3ae_ray.images import decode_image
from c3ae_ray.loop import batches_of, build_training, train_epoch
from c3ae_ray.train import TrainConfig

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def faces(count: int) -> tuple[list[np.ndarray], np.ndarray]:
    paths = sorted((SHARED / "utkface").glob("*.jpg"))[:count]
    return [decode_image(path.read_bytes()) for path in paths], np.array([float(path.name.split("_")[0]) for path in paths], np.float32)


def photo(face: np.ndarray) -> np.ndarray:
    """A 640x480 photo with the face in it: enlarged to 480x480, mirrored out at the sides."""
    return cv2.copyMakeBorder(cv2.resize(face, (480, 480), interpolation=cv2.INTER_CUBIC), 0, 0, 80, 80, cv2.BORDER_REFLECT)


def detection_rate(detector: FaceDetector, images: list[np.ndarray], batch: int) -> tuple[float, float]:
    """(images/s, share of images with a face) over `images` in batches, after one warm-up batch."""
    detector.detect(images[:batch])
    if detector.device == "cuda":
        torch.cuda.synchronize()
    started, found = time.perf_counter(), 0
    for start in range(0, len(images), batch):
        found += sum(len(f) > 0 for f in detector.detect(images[start:start + batch]))
    return len(images) / (time.perf_counter() - started), found / len(images)


def training_rate(device: str, regions: torch.Tensor, boxes: torch.Tensor, ages: torch.Tensor, batch: int) -> float:
    """Samples/s of `train_epoch` on `device` over the given faces, after a warm-up epoch on the first 4 batches."""
    cfg = TrainConfig(data="-", out="-", batch_size=batch)
    where = torch.device(device)
    model, optimizer, _ = build_training(cfg, None, where)
    held = {"region": regions.to(where), "boxes": boxes.to(where), "age": ages.to(where)}
    generator = torch.Generator(device=where).manual_seed(0)
    rows = torch.arange(len(ages))
    train_epoch(model, optimizer, batches_of(held, rows[:4 * batch], batch), cfg, generator, where)
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    record = train_epoch(model, optimizer, batches_of(held, rows, batch, torch.Generator().manual_seed(1)), cfg, generator, where)
    return record["train_samples"] / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32, help="images per detection batch")
    parser.add_argument("--train-samples", type=int, default=8192, help="samples per measured training epoch")
    parser.add_argument("--train-batch", type=int, default=256)
    parser.add_argument("--cpu-share", type=int, default=8, help="the CPU baseline runs on 1/this of the work")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    print(f"GPU: {torch.cuda.get_device_name() if gpu else 'none (CPU baseline only)'}; CPU threads: {torch.get_num_threads()}", flush=True)
    small, ages = faces(args.images)
    sizes = {"200x200": small, "640x480": [photo(face) for face in small]}
    devices = ["cpu", "cuda"] if gpu else ["cpu"]
    print(f"{'MTCNN, batches of ' + str(args.batch):<28} {'device':>6} {'images':>6} {'images/s':>9} {'with a face':>11}", flush=True)
    for label, images in sizes.items():
        for device in devices:
            subset = images if device == "cuda" else images[:max(args.batch, len(images) // args.cpu_share)]
            rate, found = detection_rate(FaceDetector(device), subset, args.batch)
            print(f"{label:<28} {device:>6} {len(subset):>6} {rate:>9.1f} {found:>11.1%}", flush=True)

    crop = CropConfig()
    box = np.array([50, 50, 150, 150], np.float32)  # UTKFace's faces are centred and fill the middle of the photo
    cut = [cut_region(face, box, crop) for face in small]
    repeat = -(-args.train_samples // len(cut))
    regions = torch.from_numpy(np.stack([r for r, _ in cut])).repeat(repeat, 1, 1, 1)[:args.train_samples]
    boxes = torch.from_numpy(np.stack([b for _, b in cut])).repeat(repeat, 1, 1)[:args.train_samples]
    ages_t = torch.from_numpy(ages).repeat(repeat)[:args.train_samples]
    print(f"{'training, batches of ' + str(args.train_batch):<28} {'device':>6} {'samples':>7} {'samples/s':>9}", flush=True)
    for device in devices:
        n = args.train_samples if device == "cuda" else max(4 * args.train_batch, args.train_samples // args.cpu_share)
        rate = training_rate(device, regions[:n], boxes[:n], ages_t[:n], args.train_batch)
        print(f"{'':<28} {device:>6} {n:>7} {rate:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
