"""Preprocessing throughput: `c3ae preprocess` end to end against one-process facenet-pytorch loops.

    .venv/bin/python benchmarks/preprocess_throughput.py [--images 2000] [--device cpu|cuda]

On the first N images (by path) of ../shared/data/utkface, in one run:
- baseline A: stock facenet-pytorch MTCNN in one process (torch's default threads), decode + detect per image;
- baseline B: the same in batches of 32 (the goal's reference);
- also: our FaceDetector (ONNX Runtime networks on CPUs) in one process, batches of 32, to separate the two gains;
- `c3ae preprocess --dataset utkface --limit N` as a user runs it (Ray start-up, actor pool, Parquet, summary).
Prints images/s, the ratios and peak memory (the pipeline's is the sum over Ray's processes, sampled).
With --device cuda (on a GPU machine) it also reports MTCNN images/s on the GPU (detector stage only).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from c3ae_ray.datasets import read_dataset
from c3ae_ray.detect import FaceDetector
from c3ae_ray.images import decode_image
from measure import run_sampled

UTKFACE = Path(__file__).resolve().parents[2] / "shared" / "data" / "utkface"


def loop_rate(paths: list[str], detect, batch: int) -> float:
    """Images/s of decode + detect over `paths`, `batch` images per detector call."""
    start = time.perf_counter()
    for i in range(0, len(paths), batch):
        images = [decode_image(Path(p).read_bytes()) for p in paths[i : i + batch]]
        detect(np.stack(images) if batch > 1 else images[0])
    return len(paths) / (time.perf_counter() - start)


def run_pipeline(n: int, device: str) -> tuple[float, int, str]:
    """-> (images/s end to end, peak tree RSS bytes, the summary the CLI printed)."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [str(Path(sys.executable).with_name("c3ae")), "preprocess", "--dataset", "utkface",
                   "--root", str(UTKFACE), "--out", f"{tmp}/out", "--limit", str(n), "--device", device]
        elapsed, samples, printed = run_sampled(command)
        return n / elapsed, max(rss for _, rss in samples), printed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()

    import torch
    from facenet_pytorch import MTCNN

    paths = [r["path"] for r in read_dataset("utkface", UTKFACE).records[: args.images]]
    n = len(paths)
    print(f"{n} images of {UTKFACE}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    stock = MTCNN(keep_all=True, device=args.device)
    ours = FaceDetector(args.device)
    stock.detect(decode_image(Path(paths[0]).read_bytes()))
    per_image = loop_rate(paths, lambda x: stock.detect(x, landmarks=True), 1)
    print(f"one process, stock MTCNN, per image     : {per_image:7.1f} images/s  (baseline A)")
    batched = loop_rate(paths, lambda x: stock.detect(x, landmarks=True), 32)
    print(f"one process, stock MTCNN, batches of 32 : {batched:7.1f} images/s  (baseline B)")
    channels_last = loop_rate(paths, lambda x: ours.detect(list(x)), 32)
    print(f"one process, our detector, batches of 32: {channels_last:7.1f} images/s")
    baseline_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stock = ours = None  # free both detectors before the pipeline runs

    rate, peak, printed = run_pipeline(n, args.device)
    print(f"c3ae preprocess end to end              : {rate:7.1f} images/s  (Ray start-up included)")
    print(f"ratio to baseline B: {rate / batched:.2f}x (goal >= 1.1x); to baseline A: {rate / per_image:.2f}x (goal >= 2x)")
    print(f"peak memory: one-process loops {baseline_peak / 2**20:.0f} MiB; pipeline (all Ray processes) {peak / 2**20:.0f} MiB")
    print("the pipeline's own summary:")
    print(printed.rstrip())


if __name__ == "__main__":
    main()
