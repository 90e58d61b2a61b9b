"""Model forward speed on CPU, one thread: crop triplets per second, batched against one at a time.

    .venv/bin/python benchmarks/model_forward.py [--variant full] [--seconds 3] [--onnx]

The same-run baseline is the unbatched forward (batch 1); the paper reports 0.0126 s per image on a Xeon.
The bundled model is timed too: it averages each face with its mirror image (`mirror_average`), two passes;
as loaded (the baseline of that line) and with its BatchNorms folded into the convolutions (`for_inference`).
--onnx also times the same network exported by `c3ae export` in onnxruntime (one thread).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from c3ae_ray.model import BUNDLED_MODEL, VARIANTS, C3AE, for_inference, load_model, save_model

PAPER_SECONDS_PER_IMAGE = 0.0126


def triplets_per_second(model: C3AE, batch_size: int, seconds: float) -> float:
    crops = torch.randint(0, 256, (batch_size, 3, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        model(crops)  # warm-up
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model(crops)
            done += batch_size
    return done / (time.perf_counter() - start)


def onnx_triplets_per_second(batch_size: int, seconds: float, path: str) -> float:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    crops = torch.randint(0, 256, (batch_size, 3, 3, 64, 64), dtype=torch.uint8).numpy()
    session.run(None, {"crops": crops})  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run(None, {"crops": crops})
        done += batch_size
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="full", choices=list(VARIANTS))
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--onnx", action="store_true", help="also time the network in onnxruntime")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = C3AE(VARIANTS[args.variant]).eval()
    baseline = triplets_per_second(model, 1, args.seconds)
    print(f"variant {args.variant}, 1 thread, torch {torch.__version__}")
    print(f"batch    1: {baseline:9.0f} triplets/s  (baseline; paper: {1 / PAPER_SECONDS_PER_IMAGE:.0f} images/s)")
    for batch_size in (16, 64, 256):
        rate = triplets_per_second(model, batch_size, args.seconds)
        print(f"batch {batch_size:4d}: {rate:9.0f} triplets/s  ({rate / baseline:.2f}x batch 1)")
    bundled, _ = load_model(BUNDLED_MODEL)
    folded = for_inference(bundled)
    passes = 2 if bundled.cfg.mirror_average else 1
    for batch_size in (1, 256):
        rate = triplets_per_second(bundled, batch_size, args.seconds)
        fast = triplets_per_second(folded, batch_size, args.seconds)
        print(f"bundled model ({passes} pass(es) per face), batch {batch_size:4d}: {rate:9.0f} triplets/s; "
              f"BatchNorm folded as every stage runs it (`for_inference`): {fast:9.0f} ({fast / rate:.2f}x)")
    if args.onnx:
        from c3ae_ray.export import export_model

        with tempfile.TemporaryDirectory() as folder:
            save_model(model, f"{folder}/model.pt")
            path = export_model(f"{folder}/model.pt", "onnx", f"{folder}/model.onnx")["out"]
            for batch_size in (1, 64, 256):
                rate = onnx_triplets_per_second(batch_size, args.seconds, path)
                print(f"onnxruntime, batch {batch_size:4d}: {rate:9.0f} triplets/s  ({rate / baseline:.2f}x torch batch 1)")


if __name__ == "__main__":
    main()
