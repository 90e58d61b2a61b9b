"""Training throughput: `c3ae train` (Ray Train, 1 and 2 CPU workers) against its own worker step without
Ray, and against the common design in public age-estimation code, a one-process PyTorch loop whose
DataLoader augments each sample with OpenCV.

All train the same C3AE on rows of a `c3ae preprocess` output (the stored face regions) with the same
augmentations (box shift, rotation, flip, brightness/contrast/temperature, erasing). Figures are training
samples per second from the second epoch on; the baselines run in the same process, right before, so noise
is shared. While each `c3ae train` runs, the CPU seconds of Ray's processes are read from /proc from the
end of epoch 1: the training worker(s), Ray's other workers (the data plane) and Ray's daemons.

    .venv/bin/python benchmarks/train_throughput.py --data PREPROCESSED [--samples 3000] [--epochs 2] [--workers 1 2]

Goals: issue 24, on all 21.7k shared UTKFace faces: c3ae train with one CPU worker at least 0.85x the worker
step without Ray, two workers not slower than one, the data plane under 15% of the trainer's CPU.
Issue 4: at least 2x the plain loop on the 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import threading
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
            loss = c3ae_loss(model, model(crops), ages)["total"]
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
    table = data.read().slice(0, 2000)  # the training columns; 2,000 faces fit in cache like a real shard
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
            prediction = model(crop_batch(regions[pick], boxes[pick], AugmentConfig(), generator))
        loss = c3ae_loss(model, prediction, ages[pick])["total"]
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


class RayCpu:
    """CPU seconds of this machine's Ray processes from /proc (Linux), split into the training workers, the
    rest of Ray's workers (Ray Data's read/decode tasks, its split coordinator, the train controller) and
    Ray's daemons (raylet, GCS, dashboard). Sampled every second, so processes that exit keep their share."""

    def __init__(self):
        self.first, self.last, self.kind = {}, {}, {}

    @staticmethod
    def _sample() -> dict:
        seen, tick = {}, os.sysconf("SC_CLK_TCK")
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as file:
                    command = file.read().replace(b"\0", b" ").decode(errors="replace")
                with open(f"/proc/{pid}/stat") as file:
                    fields = file.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(pid) == os.getpid() or "ray" not in command.lower():
                continue
            kind = "trainer" if "RayTrainWorker" in command else "ray workers" if command.startswith("ray::") else "ray daemons"
            seen[pid] = (kind, (int(fields[11]) + int(fields[12])) / tick)  # utime + stime
        return seen

    def start(self) -> None:
        self.first = {pid: cpu for pid, (_, cpu) in self._sample().items()}
        self.update()

    def update(self) -> None:
        for pid, (kind, cpu) in self._sample().items():
            self.last[pid], self.kind[pid] = cpu, kind

    def totals(self) -> dict:
        totals = {"trainer": 0.0, "ray workers": 0.0, "ray daemons": 0.0}
        for pid, cpu in self.last.items():
            totals[self.kind[pid]] += cpu - self.first.get(pid, 0.0)
        return totals


def ray_train(data_location: str, workers: int, epochs: int) -> dict:
    """`c3ae train` for a few epochs, with Ray's CPU use sampled from the end of epoch 1 to the end of the run.
    -> {history: the per-epoch records, cpu: CPU seconds by kind over epochs 2.., summary}."""
    with tempfile.TemporaryDirectory() as folder:
        run, cpu, done = f"{folder}/run", RayCpu(), threading.Event()

        def sample() -> None:
            while not os.path.isdir(f"{run}/checkpoints/epoch_001"):
                if done.wait(0.2):
                    return
            cpu.start()
            while not done.wait(1.0):
                cpu.update()

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            summary = train(build(TrainConfig, {"data": data_location, "out": run, "epochs": epochs, "workers": workers}))
        finally:
            done.set()
            sampler.join()
        with open(f"{run}/metrics.json") as file:
            history = json.load(file)
    assert summary["epochs"] == epochs
    return {"history": history, "cpu": cpu.totals(), "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a `c3ae preprocess` output (e.g. of the shared UTKFace images)")
    parser.add_argument("--samples", type=int, default=3000, help="samples the plain loop trains on")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per Ray Train run (figures are from epoch 2 on)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray Train runs to make")
    parser.add_argument("--no-plain-loop", action="store_true", help="skip the DataLoader baseline (issue 4's)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"data: {args.data} ({len(open_faces(args.data).ages)} faces); torch threads {torch.get_num_threads()}", flush=True)

    baseline = None if args.no_plain_loop else plain_loop(args.data, args.samples, args.batch_size)
    if baseline:
        print(f"baseline  plain loop, DataLoader with per-sample OpenCV augmentation, fp32: {baseline:7.1f} samples/s", flush=True)
    step = batched_loop(args.data, "cpu", max(args.samples, 5000), args.batch_size)
    print(f"worker step without Ray (batched augmentation, bf16 where supported, fed from memory): {step:7.1f} samples/s"
          + (f"  = {step / baseline:.2f}x baseline" if baseline else ""), flush=True)
    rates = {}
    for workers in args.workers:
        result = ray_train(args.data, workers, args.epochs)
        history, cpu = result["history"], result["cpu"]
        later = history[1:] or history
        rates[workers] = sum(r["train_samples"] for r in later) / sum(r["train_samples"] / r["samples_per_s"] for r in later)
        data_mode = result["summary"]["config"].get("data_cache", "stream (before issue 24)")
        print(f"c3ae train, {workers} CPU worker(s), data {data_mode}, val MAE {result['summary']['val_mae']:.2f} after "
              f"{args.epochs} epochs:", flush=True)
        for record in history:
            print(f"    epoch {record['epoch']}: {record['epoch_s']:6.1f} s (+ {record.get('data_load_s', 0):.0f} s loading the faces), "
                  f"{record['samples_per_s']:6.1f} samples/s, waited for data {record.get('data_wait_s', float('nan')):5.1f} s, "
                  f"val MAE {record['val_mae']:.2f}")
        share = cpu["ray workers"] / max(cpu["trainer"], 1e-9)
        print(f"    from epoch 2: {rates[workers]:7.1f} samples/s = {rates[workers] / step:.2f}x the worker step"
              + (f" = {rates[workers] / baseline:.2f}x baseline" if baseline else ""))
        print(f"    CPU from epoch 2: trainer {cpu['trainer']:.0f} s, rest of Ray's workers (data plane) {cpu['ray workers']:.0f} s "
              f"= {share:.0%} of the trainer's, Ray daemons {cpu['ray daemons']:.0f} s", flush=True)
    if torch.cuda.is_available():
        gpu = batched_loop(args.data, "cuda", 20 * args.samples, 256)
        print(f"GPU ({torch.cuda.get_device_name()}): model + batched augmentation, batch 256: {gpu:9.1f} samples/s")
    else:
        print("GPU: none on this machine, no GPU figure")
    one = rates.get(1)
    if one:
        print(f"goal (issue 24) c3ae train >= 0.85x the worker step, 1 worker: {'met' if one >= 0.85 * step else 'NOT met'} ({one / step:.2f}x)")
    if one and 2 in rates:
        print(f"goal (issue 24) 2 workers not slower than 1: {'met' if rates[2] >= 0.97 * one else 'NOT met'} ({rates[2] / one:.2f}x)")
    if baseline:
        best = max(rates.values())
        print(f"goal (issue 4) >= 2x the plain loop: {'met' if best >= 2 * baseline else 'NOT met'} ({best / baseline:.2f}x)")


if __name__ == "__main__":
    main()
