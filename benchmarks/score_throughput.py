"""Batch scoring throughput and memory: `c3ae score` end to end against a one-process loop doing the same work.

    .venv/bin/python benchmarks/score_throughput.py [--folders utkface utkface-more] [--images N] [--repeat K] [--rounds R] [--model model.pt]

On the first N images (by path; default all) of the --folders of ../shared/data (default both UTKFace folders,
21,692 images), in one run:
- baseline: one process (torch's default threads) reading, decoding and running `Estimator` (MTCNN in
  batches of 32, the crops, C3AE) over the images; it also times detection alone on the first 500 images,
  which says what share of the work the model has (why detector and model share an actor);
- `c3ae score --input <folder or list of the N images>` as a user runs it (Ray start-up, actor pool, Parquet,
  summary).
With --rounds R both run R times, every other round the pipeline first (this machine's speed drifts within
minutes); each round's ratio is taken within the round, and the median is the figure. Both run as child
processes whose whole process tree's RSS is sampled; the pipeline's peak is given for each
quarter of its run, which shows whether memory grows with the input (--repeat K scores the images K times
over, through a file list, for a longer run). Without --model an untrained C3AE is
used: speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from measure import model_or_untrained, run_sampled

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def loop(paths_file: str, model: str) -> None:
    """The one-process baseline (run in a child): prints its figures as JSON."""
    from c3ae_ray.images import decode_image
    from c3ae_ray.inference import Estimator, ImageFaces

    paths = Path(paths_file).read_text().split("\n")
    estimator = Estimator(model, device="cpu")
    estimator.estimate([decode_image(Path(paths[0]).read_bytes())])  # warm-up
    images = [decode_image(Path(p).read_bytes()) for p in paths[:500]]
    start = time.perf_counter()
    for i in range(0, len(images), 32):
        estimator.finder.detector.detect_each(images[i : i + 32])
    detect_s = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(0, len(images), 32):
        estimator.estimate(images[i : i + 32])
    estimate_s = time.perf_counter() - start
    del images
    faces = 0
    start = time.perf_counter()
    for i in range(0, len(paths), 32):
        batch = [decode_image(Path(p).read_bytes()) for p in paths[i : i + 32]]
        faces += sum(len(result.faces) for result in estimator.estimate(batch) if isinstance(result, ImageFaces))
    elapsed = time.perf_counter() - start
    print(json.dumps({"images_per_s": len(paths) / elapsed, "faces": faces, "model_share": 1 - detect_s / estimate_s}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folders", nargs="+", default=["utkface", "utkface-more"], help="folders of ../shared/data")
    parser.add_argument("--images", type=int, help="the first N images (default: all)")
    parser.add_argument("--repeat", type=int, default=1, help="list every image K times (a longer run)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of both contenders, in alternating order")
    parser.add_argument("--model", help="a model.pt (default: an untrained C3AE)")
    parser.add_argument("--loop", nargs=2, metavar=("PATHS_FILE", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loop:
        return loop(*args.loop)

    import torch

    folders = [SHARED_DATA / name for name in args.folders]
    paths = sorted(str(p) for folder in folders for p in folder.iterdir() if p.suffix == ".jpg")[: args.images] * args.repeat
    n = len(paths)
    print(f"{n} images of {', '.join(map(str, folders))}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), {args.rounds} round(s)")
    ratios, pipeline_ratios = [], []
    with tempfile.TemporaryDirectory() as tmp:
        model = model_or_untrained(args.model, tmp)
        listing = Path(tmp) / "images.txt"
        listing.write_text("\n".join(paths))
        source = str(folders[0]) if len(folders) == 1 and args.images is None and args.repeat == 1 else str(listing)
        command = [str(Path(sys.executable).with_name("c3ae")), "score", "--input", source, "--out", f"{tmp}/out", "--model", model,
                   "--overwrite"]
        for round_index in range(args.rounds):
            # the machine's speed drifts: every other round runs the pipeline first
            order = ("loop", "score") if round_index % 2 == 0 else ("score", "loop")
            for contender in order:
                if contender == "loop":
                    _, loop_samples, printed = run_sampled([sys.executable, __file__, "--loop", str(listing), model])
                    base = json.loads(printed)
                else:
                    elapsed, samples, summary = run_sampled(command)
            rate = n / elapsed
            pipeline_s = float(summary.split(" s in the Ray Data pipeline")[0].rsplit("(", 1)[1])
            ratios.append(rate / base["images_per_s"])
            pipeline_ratios.append(n / pipeline_s / base["images_per_s"])
            print(f"round {round_index + 1} ({' first, '.join(order)} second):")
            print(f"  one-process loop (read, decode, MTCNN batches of 32, crops, C3AE): {base['images_per_s']:6.1f} images/s "
                  f"(baseline), {base['faces']} faces; the model and crops are {base['model_share']:.0%} of the work")
            print(f"  c3ae score end to end (CLI and Ray start-up included)           : {rate:6.1f} images/s: {ratios[-1]:.2f}x")
            print(f"  the same run's Ray Data pipeline alone                           : {n / pipeline_s:6.1f} images/s: "
                  f"{pipeline_ratios[-1]:.2f}x", flush=True)
    print(f"ratio to the loop (median of {args.rounds} round(s)): {statistics.median(ratios):.2f}x end to end (rounds: "
          f"{', '.join(f'{r:.2f}x' for r in ratios)}; issue 21: >= 0.9x), {statistics.median(pipeline_ratios):.2f}x for the "
          "pipeline alone")
    quarters = [max((rss for t, rss in samples if q * elapsed / 4 <= t < (q + 1) * elapsed / 4), default=0) for q in range(4)]
    print(f"peak memory (last round): loop {max(r for _, r in loop_samples) / 2**20:.0f} MiB; pipeline (all Ray processes) "
          f"{max(quarters) / 2**20:.0f} MiB, by quarter of the run: {' / '.join(f'{q / 2**20:.0f}' for q in quarters)} MiB")
    print("the pipeline's own summary (last round):")
    print(summary.rstrip())


if __name__ == "__main__":
    main()
