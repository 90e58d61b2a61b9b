"""Load on the Serve app over loopback: closed-loop clients against `c3ae serve`, and the in-process limit.

    .venv/bin/python benchmarks/serve_load.py [--rounds 3] [--seconds 10] [--model model.pt] [--memory-requests 10000]

On the first 256 images (by name) of ../shared/data/utkface (200 x 200, one face each), in --rounds rounds,
each measuring:
- the limit: one process running `Estimator` (MTCNN, crops, C3AE; torch's default threads) on the decoded
  images in batches of 16, with no HTTP, no Ray and no JSON: images/s;
- `c3ae serve` (its own local Ray, started afresh as a user starts it) with batching (--max-batch-size 16),
  with batches of 1, with batching and two workers behind the ingress (detector, then model: `split_workers`,
  the GPU topology; on CPUs each replica of the ingress runs the whole path itself), and with batching under Serve's default settings
  (`c3ae serve` turns on Serve's high-throughput mode, `serving.high_throughput_settings`: here both switches
  =0); with --settings-one-at-a-time also without HAProxy (Serve's Python proxy) and without gRPC between
  deployments. For each, closed-loop clients at concurrency 1, 8 and 32 for --seconds each: requests/s,
  p50/p95/p99 latency and errors (any answer but 200).
Each round starts the settings one place further along (round 2 begins with the second), because on this
machine a setting measured later in a run came out faster whatever it was; the summary gives medians over
the rounds, and each ratio to the limit is taken within its round (the limit is measured at the round's start).
Memory: the server's whole process tree (Ray included) after 1,000 and after --memory-requests requests
(batching, concurrency 8; first round).
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
import statistics
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
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200:
                return process
        except requests.RequestException:
            time.sleep(1)
    process.kill()
    log.seek(0)
    tail = log.read().decode(errors="replace")[-3000:]
    raise SystemExit(f"c3ae serve did not become healthy (exit code {process.poll()}); its output ended:\n{tail}")


def stop_server(process: subprocess.Popen) -> None:
    process.send_signal(2)
    try:
        process.wait(timeout=90)
    except subprocess.TimeoutExpired:
        process.kill()


def measure_limit(listing: Path, model: str, seconds: float) -> float:
    """The in-process limit in a child process (its own torch, no Ray): images/s."""
    printed = subprocess.run([sys.executable, __file__, "--limit", str(listing), model, str(seconds)],
                             capture_output=True, text=True, check=True).stdout
    return json.loads(printed.strip().splitlines()[-1])["images_per_s"]


def measure_server(name: str, settings: tuple, model: str, port: int, bodies: list[bytes], seconds: float,
                   memory_requests: int = 0) -> tuple[dict[int, dict], dict[int, int]]:
    """One fresh `c3ae serve` with `settings` (batch size, environment, --config): {concurrency: result}, and
    {requests: server memory} when `memory_requests` (measured first, so the counts are requests since start)."""
    batch, env, config = settings
    url, results, memory = f"http://127.0.0.1:{port}", {}, {}
    server = start_server(model, port, batch, env=env, config=config)
    try:
        if memory_requests:
            asyncio.run(closed_loop(url, bodies, 8, requests_total=1000))
            memory[1000] = tree_rss(server.pid)
            asyncio.run(closed_loop(url, bodies, 8, requests_total=memory_requests - 1000))
            memory[memory_requests] = tree_rss(server.pid)
        else:
            asyncio.run(closed_loop(url, bodies, 8, seconds=3))  # warm-up
        for level in LEVELS:
            result = results[level] = asyncio.run(closed_loop(url, bodies, level, seconds=seconds))
            print(f"  {name}, concurrency {level:2d}: {result['rps']:6.1f} req/s, p50 {result['p50']:6.0f} ms, "
                  f"p95 {result['p95']:6.0f} ms, p99 {result['p99']:6.0f} ms, errors {result['errors']} of {result['n']}", flush=True)
        stats = requests.get(f"{url}/v1/stats", timeout=30).json()
        seen = {worker: stats[worker]["batches"] for worker in ("age_estimator", "face_finder", "age_predictor") if worker in stats}
        print(f"    batch sizes seen by one replica of each batching deployment (size: batches): {seen}", flush=True)
    finally:
        stop_server(server)
    return results, memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every setting, each in a rotated order")
    parser.add_argument("--seconds", type=float, default=10.0, help="per concurrency level")
    parser.add_argument("--model", help="a model.pt (default: an untrained C3AE)")
    parser.add_argument("--memory-requests", type=int, default=10_000, help="requests before the second memory reading (0: none)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--settings-one-at-a-time", action="store_true",
                        help="also serve without HAProxy, then without gRPC between deployments")
    parser.add_argument("--limit", nargs=3, metavar=("PATHS_FILE", "MODEL", "SECONDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.limit:
        return limit(args.limit[0], args.limit[1], float(args.limit[2]))
    if args.rounds < 1 or 0 < args.memory_requests <= 1000:
        parser.error("--rounds must be at least 1 and --memory-requests 0 or over 1,000")

    import torch

    paths = sorted(str(p) for p in UTKFACE.iterdir() if p.suffix == ".jpg")[:256]
    bodies = [Path(p).read_bytes() for p in paths]
    print(f"{len(paths)} UTKFace images (200 x 200), {os.cpu_count()} CPUs, torch {torch.__version__}, {args.rounds} rounds")
    results: dict[tuple[str, int], list[dict]] = {}  # (setting, concurrency) -> one result per round
    shares: dict[str, list[float]] = {}  # setting -> its req/s at concurrency 32 / the same round's limit
    limits, memory = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        model = model_or_untrained(args.model, tmp)
        listing = Path(tmp) / "images.txt"
        listing.write_text("\n".join(paths))
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
        names = list(servers)
        for round_index in range(args.rounds):
            limits.append(measure_limit(listing, model, args.seconds))
            print(f"round {round_index + 1} of {args.rounds}: in-process limit (Estimator, batches of 16, no HTTP): "
                  f"{limits[-1]:.1f} images/s", flush=True)
            for name in names[round_index % len(names):] + names[:round_index % len(names)]:
                first = round_index == 0 and name == "batching"
                by_level, measured = measure_server(name, servers[name], model, args.port, bodies, args.seconds,
                                                    args.memory_requests if first else 0)
                memory.update(measured)
                for level, result in by_level.items():
                    results.setdefault((name, level), []).append(result)
                shares.setdefault(name, []).append(by_level[32]["rps"] / limits[-1])

    def median(name: str, level: int, key: str = "rps") -> float:
        return statistics.median(result[key] for result in results[name, level])

    print(f"\nmedians over {args.rounds} rounds; the in-process limit: {statistics.median(limits):.1f} images/s "
          f"(rounds: {', '.join(f'{rate:.1f}' for rate in limits)})")
    for name in names:
        for level in LEVELS:
            print(f"{name}, concurrency {level:2d}: {median(name, level):6.1f} req/s, p50 {median(name, level, 'p50'):6.0f} ms, "
                  f"p99 {median(name, level, 'p99'):6.0f} ms, errors {sum(r['errors'] for r in results[name, level])}")
    for name in names:
        if name != "batch size 1":
            print(f"concurrency 32, {name}: {statistics.median(shares[name]):.0%} of the same round's in-process limit "
                  f"(rounds: {', '.join(f'{share:.0%}' for share in shares[name])}; goal >= 70%)")
    comparisons = {"batching vs batch size 1": ("batching", "batch size 1", " (goal >= 1.5x)"),
                   "one deployment vs ingress and two workers": ("batching", "batching, two workers", ""),
                   "high-throughput mode vs Serve's default settings": ("batching", "batching, Serve's default settings", "")}
    for label, (one, other, goal) in comparisons.items():
        for level in LEVELS:
            ratios = [a["rps"] / b["rps"] for a, b in zip(results[one, level], results[other, level])]
            print(f"{label} at concurrency {level:2d}: {statistics.median(ratios):.2f}x "
                  f"(rounds: {', '.join(f'{ratio:.2f}x' for ratio in ratios)}){goal}")
    ratios = [result["p99"] / result["p50"] for result in results["batching", 8]]
    print(f"p99 / p50 at concurrency 8 with batching: {statistics.median(ratios):.2f} "
          f"(rounds: {', '.join(f'{ratio:.2f}' for ratio in ratios)}; goal <= 3)")
    if memory:
        (n1, m1), (n2, m2) = sorted(memory.items())
        print(f"server memory (all Ray processes): {m1 / 2**20:.0f} MiB after {n1:,} requests, {m2 / 2**20:.0f} MiB after "
              f"{n2:,}: {m2 / m1 - 1:+.1%} (goal within 10%)")


if __name__ == "__main__":
    main()
