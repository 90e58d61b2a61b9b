"""Training throughput: `c3ae train` (Ray Train, 1 and 2 CPU workers) against the common design in public
age-estimation code, a one-process PyTorch loop whose DataLoader augments each sample with OpenCV.

Both train the same C3AE on the same rows of a `c3ae preprocess` output (the stored face regions) with the
same augmentations (box shift, rotation, flip, brightness/contrast/temperature, erasing). Figures are
training samples per second; the baseline runs in the same process, right before, so noise is shared.

    .venv/bin/python benchmarks/train_throughput.py --data PREPROCESSED [--samples 3000] [--epochs 2]

Goal (issue 4): at least 2x the plain loop on the 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time

import cv2
import numpy as np
import torch

from c3ae_ray.augment import AugmentConfig, crop_batch
from c3ae_ray.config import build
from c3ae_ray.faces import decode_faces, open_faces
from c3ae_ray.loop import bf16_supported
from c3ae_ray.model import C3AE, c3ae_loss
from c3ae_ray.train import TrainConfig, train


class OpenCVFaces(torch.utils.data.Dataset):
    """Per sample: decode the region, then per box an OpenCV affine warp (shift, rotation, flip) to 64x64,
    colour jitter and random erasing in NumPy: what a typical age-estimation repository does."""

    def __init__(self, jpegs, boxes, ages, cfg: AugmentConfig, size: int = 64):
        self.jpegs, self.boxes, self.ages, self.cfg, self.size = jpegs, boxes, ages, cfg, size

    def __len__(self):
        return len(self.ages)

    def __getitem__(self, i):
        cfg, size, rng = self.cfg, self.size, np.random
        region = cv2.cvtColor(cv2.imdecode(np.frombuffer(self.jpegs[i], np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        angle = rng.uniform(-cfg.max_degrees, cfg.max_degrees) if rng.rand() < cfg.p_rotate else 0.0
        flip = rng.rand() < cfg.p_flip
        crops = []
        for x1, y1, x2, y2 in self.boxes[i]:
            side = x2 - x1
            cx = (x1 + x2) / 2 + rng.uniform(-cfg.shift, cfg.shift) * side
            cy = (y1 + y2) / 2 + rng.uniform(-cfg.shift, cfg.shift) * side
            matrix = cv2.getRotationMatrix2D((cx, cy), angle, size / side)
            matrix[:, 2] += (size / 2 - cx, size / 2 - cy)
            crop = cv2.warpAffine(region, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
            if flip:
                crop = cv2.flip(crop, 1)
            crop = crop.astype(np.float32)
            if rng.rand() < cfg.p_brightness:
                crop += rng.uniform(-cfg.brightness, cfg.brightness) * 255
            if rng.rand() < cfg.p_contrast:
                crop = (crop - crop.mean()) * rng.uniform(1 - cfg.contrast, 1 + cfg.contrast) + crop.mean()
            if rng.rand() < cfg.p_temperature:
                t = rng.uniform(-cfg.temperature, cfg.temperature)
                crop *= np.array([1 + t, 1, 1 - t], np.float32)
            if rng.rand() < cfg.p_erase:
                area = rng.uniform(*cfg.erase_area) * size * size
                ratio = math.exp(rng.uniform(math.log(cfg.erase_ratio[0]), math.log(cfg.erase_ratio[1])))
                h, w = min(size, round(math.sqrt(area * ratio))), min(size, round(math.sqrt(area / ratio)))
                top, left = rng.randint(0, size - h + 1), rng.randint(0, size - w + 1)
                crop[top : top + h, left : left + w] = rng.uniform(0, 255, (h, w, 3))
            crops.append(np.clip(crop, 0, 255).transpose(2, 0, 1))
        return torch.from_numpy(np.stack(crops)), torch.tensor(self.ages[i])


def plain_loop(data_location: str, samples: int, batch_size: int) -> float:
    """The baseline: DataLoader (one process, per-sample OpenCV) -> fp32 model -> Adam. -> samples/s."""
    data = open_faces(data_location)
    table = data.read(["region_jpeg", "region_boxes", "age"])
    jpegs = table.column("region_jpeg").to_pylist()
    boxes = np.asarray(table.column("region_boxes").to_pylist(), np.float32).reshape(len(jpegs), -1, 4)
    loader = torch.utils.data.DataLoader(
        OpenCVFaces(jpegs, boxes, table.column("age").to_numpy().astype(np.float32), AugmentConfig()),
        batch_size=batch_size, shuffle=True, num_workers=0, drop_last=True,
    )
    model = C3AE()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.005, weight_decay=1e-4)
    model.train()
    seen, started = 0, None
    while seen < samples:
        for crops, ages in loader:
            age, distribution = model(crops)
            loss = c3ae_loss(model, age, distribution, ages)["total"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if started is None:  # the first batch warms up the kernels
                started = time.perf_counter()
                continue
            seen += len(ages)
            if seen >= samples:
                break
    return seen / (time.perf_counter() - started)


def batched_loop(data_location: str, device: str, samples: int, batch_size: int) -> float:
    """Our per-worker step without Ray: decoded regions on `device` -> crop_batch (augmenting) -> bf16 model.
    -> samples/s. On CPU it shows what Ray Train adds or costs; on a GPU it is the figure the issue asks for."""
    data = open_faces(data_location)
    table = data.read().slice(0, 2000)  # the training columns
    batch = decode_faces(table, None, 0.0, data.crop)
    regions = torch.from_numpy(batch["region"]).to(device)
    boxes, ages = torch.from_numpy(batch["boxes"]).to(device), torch.from_numpy(batch["age"]).to(device)
    model = C3AE().to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.005, weight_decay=1e-4)
    generator = torch.Generator(device=device)
    use_bf16 = bf16_supported(torch.device(device))
    seen, started = 0, None
    while seen < samples:
        pick = torch.randint(0, len(ages), (batch_size,), device=device, generator=generator)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=use_bf16):
            age, distribution = model(crop_batch(regions[pick], boxes[pick], AugmentConfig(), generator))
        loss = c3ae_loss(model, age.float(), distribution.float(), ages[pick])["total"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if started is None:
            started = time.perf_counter()
            continue
        seen += batch_size
    if device == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - started)


def ray_train(data_location: str, workers: int, epochs: int) -> float:
    """`c3ae train` for a few epochs; -> samples/s of its last epoch (the first includes warm-up)."""
    with tempfile.TemporaryDirectory() as folder:
        summary = train(
            build(TrainConfig, {"data": data_location, "out": f"{folder}/run", "epochs": epochs, "workers": workers})
        )
        with open(f"{folder}/run/metrics.json") as file:
            history = json.load(file)
    assert summary["epochs"] == epochs
    return history[-1]["samples_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a `c3ae preprocess` output (e.g. of the shared UTKFace images)")
    parser.add_argument("--samples", type=int, default=3000, help="samples the plain loop trains on")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per Ray Train run")
    parser.add_argument("--batch-size", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"data: {args.data} ({len(open_faces(args.data).ages)} faces); torch threads {torch.get_num_threads()}")

    baseline = plain_loop(args.data, args.samples, args.batch_size)
    print(f"baseline  plain loop, DataLoader with per-sample OpenCV augmentation, fp32: {baseline:7.1f} samples/s")
    one_process = batched_loop(args.data, "cpu", args.samples, args.batch_size)
    print(f"one process, batched augmentation + bf16 where supported, no Ray:   {one_process:7.1f} samples/s"
          f"  = {one_process / baseline:.2f}x baseline")
    results = {}
    for workers in (1, 2):
        results[workers] = ray_train(args.data, workers, args.epochs)
        print(f"c3ae train, {workers} CPU worker(s), batched augmentation (last epoch): {results[workers]:7.1f} samples/s"
              f"  = {results[workers] / baseline:.2f}x baseline")
    if torch.cuda.is_available():
        gpu = batched_loop(args.data, "cuda", 20 * args.samples, 256)
        print(f"GPU ({torch.cuda.get_device_name()}): model + batched augmentation, batch 256: {gpu:9.1f} samples/s")
    else:
        print("GPU: none on this machine, no GPU figure")
    best = max(results.values())
    print(f"goal >= 2x baseline: {'met' if best >= 2 * baseline else 'NOT met'} ({best / baseline:.2f}x)")


if __name__ == "__main__":
    main()
