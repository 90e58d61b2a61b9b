"""Overload: `c3ae serve` offered twice its measured capacity for five minutes.

    .venv/bin/python benchmarks/overload.py [--minutes 5] [--factor 2] [--warmup-s 60]

In one run, on the first 256 images (by name) of ../shared/data/utkface (200 x 200, one face each), against
`c3ae serve` with the bundled model (its own local Ray, started as a user starts it, default limits):
- capacity, the baseline: closed-loop clients at concurrency 16 for 30 s: answered requests/s;
- overload: an open-loop client that sends at --factor times that rate for --minutes, on a fixed schedule
  whatever the answers (each request with a 60 s deadline);
- every answer tallied: 200; 503 in the JSON envelope with Retry-After (the refusal promised); anything else
  (a failure); the answered requests' p50 and p99 per minute;
- resident memory of every process of the server (Ray's included), by process, after --warmup-s of overload
  and at its end: the largest growth.
Goals: every refusal a JSON 503 with Retry-After, none of anything else; the accepted requests' p99 bounded
(the same in the last minute as in the first); no process's memory more than 10% above its warmed-up size.
The client shares the server's 2 cores: its cost is part of every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter

import numpy as np

from measure import tree_processes
from serve_load import UTKFACE, closed_loop, start_server, stop_server

from c3ae_ray.model import BUNDLED_MODEL


async def open_loop(url: str, bodies: list[bytes], rate: float, seconds: float, at_warm=None) -> list[tuple[float, str, float]]:
    """Requests sent at `rate` per second for `seconds`: [(send time, outcome, latency s)]; `at_warm(t)` is
    called once, --warmup-s into the run, by the caller's schedule."""
    import aiohttp

    results: list[tuple[float, str, float]] = []

    async def one(session, index: int, sent: float) -> None:
        started = time.perf_counter()
        try:
            async with session.post(f"{url}/v1/age", data=bodies[index % len(bodies)], headers={"Content-Type": "image/jpeg"}) as answer:
                body = await answer.read()
                if answer.status == 200:
                    outcome = "200"
                elif answer.status == 503 and answer.headers.get("Retry-After") and body.startswith(b'{"error":'):
                    outcome = "503 Retry-After"
                else:
                    outcome = f"{answer.status} (FAILURE)"
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            outcome = f"no answer: {type(error).__name__} (FAILURE)"
        results.append((sent, outcome, time.perf_counter() - started))

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        start, tasks, index = time.perf_counter(), [], 0
        while (now := time.perf_counter() - start) < seconds:
            due = index / rate
            if due > now:
                await asyncio.sleep(due - now)
            tasks.append(asyncio.create_task(one(session, index, due)))
            index += 1
            if at_warm:
                at_warm(due)
        await asyncio.gather(*tasks)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--factor", type=float, default=2.0, help="offered load / measured capacity")
    parser.add_argument("--warmup-s", type=float, default=60.0, help="overload seconds before the first memory reading")
    parser.add_argument("--port", type=int, default=8766)
    args = parser.parse_args()

    bodies = [p.read_bytes() for p in sorted(UTKFACE.iterdir())[:256]]
    url = f"http://127.0.0.1:{args.port}"
    server = start_server(str(BUNDLED_MODEL), args.port, 16, max_in_flight=None)
    try:
        asyncio.run(closed_loop(url, bodies, 8, seconds=5))  # warm-up
        capacity = asyncio.run(closed_loop(url, bodies, 16, seconds=30))
        rate = args.factor * capacity["rps"]
        print(f"capacity (closed loop, concurrency 16, 30 s): {capacity['rps']:.1f} requests/s, p99 {capacity['p99']:.0f} ms, "
              f"errors {capacity['errors']}; offering {rate:.1f} requests/s for {args.minutes:g} min", flush=True)
        memory = {}

        def at_warm(t: float) -> None:
            if "warm" not in memory and t >= args.warmup_s:
                memory["warm"] = tree_processes(server.pid)

        results = asyncio.run(open_loop(url, bodies, rate, 60 * args.minutes, at_warm))
        memory["end"] = tree_processes(server.pid)
    finally:
        stop_server(server)

    outcomes = Counter(outcome for _, outcome, _ in results)
    print(f"{len(results):,} requests offered: " + ", ".join(f"{o} x{n:,}" for o, n in outcomes.most_common()))
    answered = [(sent, latency) for sent, outcome, latency in results if outcome == "200"]
    print(f"answered {len(answered) / (60 * args.minutes):.1f} requests/s ({len(answered) / (60 * args.minutes) / capacity['rps']:.0%} of capacity)")
    for minute in range(int(np.ceil(args.minutes))):
        window = [latency for sent, latency in answered if minute * 60 <= sent < (minute + 1) * 60]
        refused = [latency for sent, outcome, latency in results if outcome.startswith("503") and minute * 60 <= sent < (minute + 1) * 60]
        if window:
            p50, p99 = np.percentile(window, [50, 99]) * 1000
            print(f"  minute {minute + 1}: {len(window):,} answered, p50 {p50:.0f} ms, p99 {p99:.0f} ms; {len(refused):,} refused "
                  f"(p99 {np.percentile(refused, 99) * 1000 if refused else 0:.0f} ms to the 503)")
    growth = []
    for pid, (title, before) in memory.get("warm", {}).items():
        if pid in memory["end"] and before > 0:
            growth.append((memory["end"][pid][1] / before - 1, memory["end"][pid][1] - before, title[:70], before))
    growth.sort(reverse=True)
    print(f"memory of {len(growth)} server processes, after {args.warmup_s:g} s of overload -> the end (largest growth first):")
    for share, grown, title, before in growth[:5]:
        print(f"  {share:+.1%} ({grown / 2**20:+.1f} MiB of {before / 2**20:.0f} MiB)  {title}")
    failures = sum(n for o, n in outcomes.items() if "FAILURE" in o)
    worst = growth[0][0] if growth else float("nan")
    print(f"summary: {failures} failure(s) of {len(results):,}; largest memory growth {worst:+.1%} (goal <= +10%)")


if __name__ == "__main__":
    main()
