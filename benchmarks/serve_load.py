"""Load on the Serve app over loopback: closed-loop clients against `c3ae serve`, and the in-process limit.

    .venv/bin/python benchmarks/serve_load.py [--seconds 20] [--model model.pt] [--memory-requests 10000]

In one run, on the first 256 images (by name) of ../shared/data/utkface (200 x 200, one face each):
- the limit: one process running `Estimator` (MTCNN, crops, C3AE; torch's default threads) on the decoded
  images in batches of 16, with no HTTP, no Ray and no JSON: images/s;
- `c3ae serve` (its own local Ray, started as a user starts it) with batching (--max-batch-size 16), then
  with batches of 1, then with batching and two workers (detector, then model: `split_workers`, the GPU
  topology; on CPUs `c3ae serve` runs one worker that does both), then with batching under Serve's default
  settings (`c3ae serve` turns on Serve's high-throughput mode, `serving.high_throughput_settings`: here both
  switches =0); for each, closed-loop clients at concurrency 1, 8 and 32 for --seconds each: requests/s,
  p50/p95/p99 latency and errors (any answer but 200);
- with --settings-one-at-a-time, two more: the high-throughput mode without HAProxy (Serve's Python proxy),
  and without gRPC between deployments (each switch on its own). Rows later in a run came out faster
  (order, not setting, in two runs): confirm a difference with alternating runs;
- memory: the server's whole process tree (Ray included) after 1,000 and after --memory-requests requests
  (batching, concurrency 8).
Goals on the 2-core machine: at concurrency 32 at least 70% of the limit; batching at least 1.5x batch size 1;
p99 at most 3x p50 at concurrency 8; memory after 10,000 requests within 10% of after 1,000.
The clients share the server's 2 cores: their cost is part of every figure. Without --model an untrained C3AE
is used (speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

from measure import model_or_untrained, tree_rss

UTKFACE = Path(__file__).resolve().parents[2] / "shared" / "data" / "utkface"
LEVELS = (1, 8, 32)


def limit(paths_file: str, model: str, seconds: float) -> None:
    """The in-process limit (run in a child): prints images/s as JSON."""
    from c3ae_ray.images import decode_image
    from c3ae_ray.inference import Estimator

    images = [decode_image(Path(p).read_bytes()) for p in Path(paths_file).read_text().split("\n")]
    estimator = Estimator(model, device="cpu")
    estimator.estimate(images[:16])  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for i in range(0, len(images), 16):
            estimator.estimate(images[i : i + 16])
            done += len(images[i : i + 16])
    print(json.dumps({"images_per_s": done / (time.perf_counter() - start)}))


async def closed_loop(url: str, bodies: list[bytes], concurrency: int, seconds: float | None = None, requests_total: int | None = None) -> dict:
    """`concurrency` clients, each sending its next request as soon as the last is answered."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    sent = 0
    deadline = time.perf_counter() + (seconds or 1e9)

    async def client(session: aiohttp.ClientSession, index: int) -> None:
        nonlocal errors, sent
        i = index
        while time.perf_counter() < deadline and (requests_total is None or sent < requests_total):
            sent += 1
            started = time.perf_counter()
            try:
                async with session.post(f"{url}/v1/age", data=bodies[i % len(bodies)], headers={"Content-Type": "image/jpeg"}) as answer:
                    await answer.read()
                    ok = answer.status == 200
            except aiohttp.ClientError:
                ok = False
            latencies.append(time.perf_counter() - started)
            errors += not ok
            i += concurrency

    start = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(client(session, i) for i in range(concurrency)))
    elapsed = time.perf_counter() - start
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99]) * 1000
    return {"rps": len(latencies) / elapsed, "p50": p50, "p95": p95, "p99": p99, "errors": errors, "n": len(latencies)}


def start_server(model: str, port: int, batch: int, max_in_flight: int | None = 256, env: dict | None = None,
                 config: str | None = None) -> subprocess.Popen:
    """`c3ae serve` on loopback, once healthy; max_in_flight None keeps the command's default (64); `env` is
    added to this process's environment (Ray's processes read Serve's settings from it); `config` a --config
    YAML."""
    command = [str(Path(sys.executable).with_name("c3ae")), "serve", "--model", model, "--port", str(port),
               "--device", "cpu", "--max-batch-size", str(batch), *(["--config", config] if config else [])]
    if max_in_flight is not None:
        command += ["--max-in-flight", str(max_in_flight)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200:
                return process
        except requests.RequestException:
            time.sleep(1)
    process.kill()
    raise SystemExit("c3ae serve did not become healthy")


def stop_server(process: subprocess.Popen) -> None:
    process.send_signal(2)
    try:
        process.wait(timeout=90)
    except subprocess.TimeoutExpired:
        process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="per concurrency level")
    parser.add_argument("--model", help="a model.pt (default: an untrained C3AE)")
    parser.add_argument("--memory-requests", type=int, default=10_000, help="requests before the second memory reading")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--settings-one-at-a-time", action="store_true",
                        help="also serve without HAProxy, then without gRPC between deployments")
    parser.add_argument("--limit", nargs=3, metavar=("PATHS_FILE", "MODEL", "SECONDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.limit:
        return limit(args.limit[0], args.limit[1], float(args.limit[2]))

    import torch

    paths = sorted(str(p) for p in UTKFACE.iterdir() if p.suffix == ".jpg")[:256]
    bodies = [Path(p).read_bytes() for p in paths]
    url = f"http://127.0.0.1:{args.port}"
    print(f"{len(paths)} UTKFace images (200 x 200), {os.cpu_count()} CPUs, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        model = model_or_untrained(args.model, tmp)
        listing = Path(tmp) / "images.txt"
        listing.write_text("\n".join(paths))
        printed = subprocess.run([sys.executable, __file__, "--limit", str(listing), model, str(args.seconds)],
                                 capture_output=True, text=True, check=True).stdout
        limit_rate = json.loads(printed.strip().splitlines()[-1])["images_per_s"]
        print(f"in-process limit (Estimator, batches of 16, no HTTP): {limit_rate:.1f} images/s")

        split = Path(tmp) / "split.yaml"
        split.write_text("split_workers: true\n")
        servers = {  # name -> (batch size, Serve's settings, --config)
            "batching": (16, {}, None), "batch size 1": (1, {}, None),
            "batching, two workers": (16, {}, str(split)),
            "batching, Serve's default settings": (16, {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0", "RAY_SERVE_ENABLE_HA_PROXY": "0"}, None),
        }
        if args.settings_one_at_a_time:
            servers["batching, no HAProxy"] = (16, {"RAY_SERVE_ENABLE_HA_PROXY": "0"}, None)
            servers["batching, no gRPC between deployments"] = (16, {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "0"}, None)
        results: dict[tuple[str, int], dict] = {}
        memory = {}
        for name, (batch, env, config) in servers.items():
            server = start_server(model, args.port, batch, env=env, config=config)
            try:
                if name == "batching" and args.memory_requests:  # first, so that the counts are requests since start
                    asyncio.run(closed_loop(url, bodies, 8, requests_total=1000))
                    memory[1000] = tree_rss(server.pid)
                    asyncio.run(closed_loop(url, bodies, 8, requests_total=args.memory_requests - 1000))
                    memory[args.memory_requests] = tree_rss(server.pid)
                else:
                    asyncio.run(closed_loop(url, bodies, 8, seconds=3))  # warm-up
                for level in LEVELS:
                    result = asyncio.run(closed_loop(url, bodies, level, seconds=args.seconds))
                    results[name, level] = result
                    print(f"{name}, concurrency {level:2d}: {result['rps']:6.1f} req/s, p50 {result['p50']:6.0f} ms, "
                          f"p95 {result['p95']:6.0f} ms, p99 {result['p99']:6.0f} ms, errors {result['errors']} of {result['n']}", flush=True)
                stats = requests.get(f"{url}/v1/stats", timeout=30).json()
                seen = {worker: stats[worker]["batches"] for worker in ("age_estimator", "face_finder", "age_predictor") if worker in stats}
                print(f"  batch sizes seen by one replica of each worker (size: batches): {seen}", flush=True)
            finally:
                stop_server(server)

    for name in servers:
        if name != "batch size 1":
            top = results[name, 32]["rps"]
            print(f"concurrency 32, {name}: {top:.1f} req/s = {top / limit_rate:.0%} of the in-process limit (goal >= 70%)")
    for level in LEVELS:
        print(f"batching vs batch size 1 at concurrency {level:2d}: {results['batching', level]['rps'] / results['batch size 1', level]['rps']:.2f}x (goal >= 1.5x)")
    default = "batching, Serve's default settings"
    for level in LEVELS:
        print(f"one worker vs two at concurrency {level:2d}: "
              f"{results['batching', level]['rps'] / results['batching, two workers', level]['rps']:.2f}x")
    for level in LEVELS:
        print(f"high-throughput mode vs Serve's default settings at concurrency {level:2d}: "
              f"{results['batching', level]['rps'] / results[default, level]['rps']:.2f}x")
    eight = results["batching", 8]
    print(f"p99 / p50 at concurrency 8 with batching: {eight['p99'] / eight['p50']:.2f} (goal <= 3)")
    if memory:
        (n1, m1), (n2, m2) = sorted(memory.items())
        print(f"server memory (all Ray processes): {m1 / 2**20:.0f} MiB after {n1:,} requests, {m2 / 2**20:.0f} MiB after "
              f"{n2:,}: {m2 / m1 - 1:+.1%} (goal within 10%)")


if __name__ == "__main__":
    main()
