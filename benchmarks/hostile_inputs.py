"""Hostile input at volume: thousands of generated files at the decoder, and thousands of generated requests at a
real `c3ae serve` over loopback (the generators of tests/hostile.py, which the property tests run in hundreds).

    .venv/bin/python benchmarks/hostile_inputs.py [--files 5000] [--requests 2000] [--seed 0]

Prints what came back, by kind of input: the decoder's outcomes (an image, or an ImageError by reason; anything
else is a failure), and the HTTP statuses by form of body (a 5xx, a traceback in an answer or an answer outside
the JSON envelope is a failure); then whether the server still answers a real photo. Exit 1 on any failure.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import requests
from hypothesis import HealthCheck, given, seed, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests.hostile

from serve_load import start_server, stop_server  # noqa: E402

from c3ae_ray.images import ImageError, decode_image  # noqa: E402
from c3ae_ray.model import BUNDLED_MODEL  # noqa: E402
from tests import hostile  # noqa: E402
from tests.fixtures import free_port  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def run_many(strategy, n: int, at: int, check) -> None:
    """`check` on n examples of `strategy` (hypothesis, no shrinking needed: `check` tallies, never raises)."""

    @seed(at)
    @settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(strategy)
    def each(example):
        check(example)

    each()


def decoder(n: int, at: int) -> Counter:
    outcomes = Counter()

    def check(data: bytes):
        try:
            decode_image(data)
            outcomes["image"] += 1
        except ImageError as error:
            outcomes[f"ImageError {error.reason}" + ("" if error.reason in hostile.READER_REASONS else " (FAILURE)")] += 1
        except Exception as error:  # the property broken
            outcomes[f"FAILURE {type(error).__name__}: {str(error)[:80]}"] += 1

    run_many(hostile.hostile_files(), n, at, check)
    return outcomes


def server(url: str, n: int, at: int) -> dict[str, Counter]:
    by_form: dict[str, Counter] = defaultdict(Counter)

    def check(request):
        form, kwargs = request
        try:
            answer = requests.post(f"{url}/v1/age", timeout=60, **kwargs)
        except requests.RequestException as error:
            by_form[form][f"FAILURE no answer: {type(error).__name__}"] += 1
            return
        try:
            document = answer.json()
            envelope = answer.status_code == 200 and "faces" in document or set(document) == {"error"}
        except ValueError:
            envelope = False
        bad = answer.status_code >= 500 or "Traceback" in answer.text or not envelope
        key = f"{answer.status_code}" + (f" {document['error']['code']}" if envelope and answer.status_code != 200 else "")
        by_form[form][key + (" (FAILURE)" if bad else "")] += 1

    run_many(hostile.api_requests(), n, at, check)
    return by_form


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=5000, help="generated files at the decoder")
    parser.add_argument("--requests", type=int, default=2000, help="generated requests at c3ae serve")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    started = time.perf_counter()
    outcomes = decoder(args.files, args.seed)
    print(f"decoder: {sum(outcomes.values()):,} generated files in {time.perf_counter() - started:.0f} s")
    for outcome, count in outcomes.most_common():
        print(f"  {count:6,}  {outcome}")

    port = free_port()
    process = start_server(str(BUNDLED_MODEL), port, 8)
    url = f"http://127.0.0.1:{port}"
    try:
        started = time.perf_counter()
        by_form = server(url, args.requests, args.seed)
        total = sum(sum(c.values()) for c in by_form.values())
        print(f"c3ae serve: {total:,} generated requests in {time.perf_counter() - started:.0f} s")
        for form, statuses in sorted(by_form.items()):
            print(f"  {form}: " + ", ".join(f"{status} x{count}" for status, count in statuses.most_common()))
        healthy = requests.get(f"{url}/healthz", timeout=30).status_code == 200
        photo = (SHARED / "faces" / "ivan.jpg").read_bytes()
        answered = requests.post(f"{url}/v1/age", data=photo, headers={"Content-Type": "image/jpeg"}, timeout=60)
        print(f"afterwards: /healthz {'200' if healthy else 'FAILED'}, a real photo -> {answered.status_code}, "
              f"{answered.json().get('n_faces')} face(s)")
    finally:
        stop_server(process)
    failures = sum(n for o, n in outcomes.items() if "FAILURE" in o)
    failures += sum(n for c in by_form.values() for s, n in c.items() if "FAILURE" in s)
    failures += (not healthy) + (answered.status_code != 200)
    print(f"summary: {args.files:,} files, {total:,} requests, {failures} failure(s)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
