"""Online predictions on Ray Serve: a batched HTTP API for the ages of every face in a photo, and its web page.

    c3ae serve [--model model.pt] [--host 127.0.0.1] [--port 8000]    (or: serve run serve/c3ae_cpu.yaml)

Three deployments, built by `build_app` (also the import path of the Serve config files in `serve/`):
- `AgeAPI`, the FastAPI ingress: reads and checks the request (API key, body cap, type, pixel cap from the
  header alone), bounds the requests it holds at once (over the bound: 503), calls the two below under a
  deadline (504), and answers JSON; every error is `{"error": {"code", "message"}}`, never a traceback.
- `FaceFinder`: decodes and runs MTCNN on a batch of requests' images, and cuts each face's region with
  `c3ae_ray.crops` (the geometry training used). It sends back the small regions, not the photo.
- `AgePredictor`: C3AE on the regions of a batch of requests in one forward pass.
The two workers batch with `@serve.batch` on a helper method; their `max_ongoing_requests` is twice the
batch size, since Serve's default of 5 would cap every batch at 5. Both count their batch sizes
(`GET /v1/stats`), which is how the tests see that concurrent requests share batches.

The ingress's limits are its `user_config` (`Limits`): a running app takes new ones without a restart.
"""


import asyncio
import base64
import binascii
import functools
import hashlib
import hmac
import json
import logging
import os
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from importlib import resources

import cv2
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from c3ae_ray import storage
from c3ae_ray.crops import CropConfig, cut_region
from c3ae_ray.detect import DetectorConfig
from c3ae_ray.images import DEFAULT_MAX_PIXELS, ImageError, decode_image, image_size
from c3ae_ray.model import BUNDLED_MODEL, load_model, model_crop, model_identity
from c3ae_ray.score import AgeModel, CutFaces, FaceCutter, ages_of, release_free_memory

logger = logging.getLogger("ray.serve")

API_KEY_ENV = "C3AE_API_KEY"  # when set where the app is built, /v1/* needs `Authorization: Bearer KEY` or `X-API-Key`
MODEL_ENV = "C3AE_MODEL"  # the model when the Serve config's args give none
IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp")
APP_NAME = "c3ae"
SELF_TEST_TIMEOUT_S = 60.0  # the first health check's inference; replicas may still be loading


def default_model() -> str:
    """The model when none is given: $C3AE_MODEL when set, else the one bundled with the package."""
    return os.environ.get(MODEL_ENV) or str(BUNDLED_MODEL)


@dataclass(frozen=True)
class Limits:
    """What one ingress replica accepts; its `user_config`, so `serve deploy` can change it in place."""

    max_body_bytes: int = 10_000_000  # 10 MB; a larger body is a 413 before it is read
    max_pixels: int = DEFAULT_MAX_PIXELS  # width x height from the image header; over it: 413, never decoded
    max_in_flight: int = 64  # requests one ingress replica holds at once; the next one gets 503 at once
    timeout_s: float = 30.0  # a request still unanswered after this gets 504
    max_faces: int = 100  # the most faces one answer carries (a request's max_faces may only lower it)


@dataclass(frozen=True)
class ServeConfig:
    model: str
    device: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    min_face_score: float = 0.9  # as in preprocessing and scoring
    max_batch_size: int = 16  # requests per detector or model batch
    batch_wait_timeout_s: float = 0.01  # how long a batch waits to fill
    limits: Limits = field(default_factory=Limits)
    detector: DetectorConfig = field(default_factory=DetectorConfig)

    @classmethod
    def from_args(cls, args: dict) -> "ServeConfig":
        """The `args` of a Serve config file (or the CLI's flags): unknown keys are an error, model defaults
        to $C3AE_MODEL, else the bundled model."""
        args = dict(args or {})
        unknown = set(args) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown serve args: {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        args["model"] = args.get("model") or default_model()
        if isinstance(args.get("limits"), dict):
            args["limits"] = Limits(**args["limits"])
        if isinstance(args.get("detector"), dict):
            args["detector"] = DetectorConfig.from_dict(args["detector"])
        return cls(**args)


class ApiError(Exception):
    """An answer other than 200: its HTTP status, a stable code and a message for people."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def image_error_status(error: ImageError) -> int:
    """413 for an image over the pixel cap, 400 for anything else that is not a usable image."""
    return 413 if error.reason == "too_large" else 400


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


# ---- the two batching workers ----


@serve.deployment  # its options (CPUs, GPU share, max_ongoing_requests) come from build_app
class FaceFinder:
    """Photos (encoded bytes) -> faces over the score threshold with their cut regions, a batch at a time."""

    def __init__(self, crop: dict, device: str, min_face_score: float, detector: dict, max_batch_size: int, batch_wait_timeout_s: float):
        import torch

        self.cutter = FaceCutter(CropConfig.from_dict(crop), device, min_face_score, DetectorConfig.from_dict(detector))
        if self.cutter.device == "cpu":
            torch.set_num_threads(1)  # one replica per CPU; the batch, not threads, is the parallelism
        self.find_batch.set_max_batch_size(max_batch_size)
        self.find_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batch_sizes: Counter = Counter()

    async def find(self, data: bytes, max_pixels: int, max_faces: int):
        """-> CutFaces with the image's (width, height), or (status, code, message) for an unusable image."""
        return await self.find_batch(data, max_pixels, max_faces)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def find_batch(self, datas: list[bytes], max_pixels: list[int], max_faces: list[int]) -> list:
        """Runs on the replica's event loop, on purpose: while a batch computes, new requests queue up and
        form the next batch. In a worker thread it would fight the event loop for the GIL, requests would
        trickle in one by one, and batches stayed at 1-3 under 32 concurrent clients (16 when blocking)."""
        self.batch_sizes[len(datas)] += 1
        if sum(self.batch_sizes.values()) % 64 == 0:
            release_free_memory()  # see score.release_free_memory: MTCNN fragments the heap
        return self._find(datas, max_pixels, max_faces)

    def _find(self, datas, max_pixels, max_faces) -> list:
        results: list = [None] * len(datas)
        images, slots = [], []
        for i, (data, cap) in enumerate(zip(datas, max_pixels)):
            try:
                images.append(decode_image(data, cap))
                slots.append(i)
            except ImageError as error:
                results[i] = (image_error_status(error), error.reason, str(error))
        cut = self.cutter.cut(images, [max_faces[i] for i in slots])
        for i, image, item in zip(slots, images, cut):
            if isinstance(item, Exception):
                logger.exception("face detection failed", exc_info=item)
                results[i] = (500, "inference_error", f"face detection failed: {type(item).__name__}")
            else:
                results[i] = (item, (image.shape[1], image.shape[0]))
        return results

    def stats(self) -> dict:
        return {"batches": dict(sorted(self.batch_sizes.items()))}


@serve.deployment
class AgePredictor:
    """The cut regions of a batch of requests -> C3AE's ages and bin distributions, in one forward pass."""

    def __init__(self, model: bytes, device: str, max_batch_size: int, batch_wait_timeout_s: float):
        import torch

        self.age_model = AgeModel(model, device)
        if self.age_model.device == "cpu":
            torch.set_num_threads(1)
        self.predict_batch.set_max_batch_size(max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batch_sizes: Counter = Counter()

    async def predict(self, regions: np.ndarray, boxes: np.ndarray):
        return await self.predict_batch(regions, boxes)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def predict_batch(self, regions: list[np.ndarray], boxes: list[np.ndarray]) -> list:
        self.batch_sizes[len(regions)] += 1
        ages, distributions = self.age_model.predict(np.concatenate(regions), np.concatenate(boxes))
        results, start = [], 0
        for part in regions:
            end = start + len(part)
            results.append((ages[start:end], None if distributions is None else distributions[start:end]))
            start = end
        return results

    def stats(self) -> dict:
        return {"batches": dict(sorted(self.batch_sizes.items()))}


# ---- the ingress ----

api = FastAPI(
    title="c3ae_ray age estimation",
    description="The age of every face in a photo (C3AE, Zhang et al., CVPR 2019) on Ray Serve.",
    version="1",
)


@api.exception_handler(ApiError)
async def _api_error(request: Request, error: ApiError):
    return error_response(error.status, error.code, error.message, error.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException):
    codes = {404: "not_found", 405: "method_not_allowed"}
    return error_response(error.status_code, codes.get(error.status_code, "http_error"), str(error.detail))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError):
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
    return error_response(400, "bad_request", problems)


@api.exception_handler(Exception)
async def _unexpected(request: Request, error: Exception):
    logger.exception("unexpected error")  # the traceback goes to the replica's log, never to the client
    return error_response(500, "internal", "internal error; see the server log")


@functools.cache
def web_page() -> str:
    return resources.files("c3ae_ray").joinpath("web/index.html").read_text()


async def read_body(request: Request, cap: int) -> bytes:
    """The body, refused with 413 as soon as it is known to pass `cap` bytes (by its Content-Length, or
    while it streams in)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > cap:
        raise ApiError(413, "body_too_large", f"the body is {int(declared):,} bytes; the cap is {cap:,}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise ApiError(413, "body_too_large", f"the body is over the cap of {cap:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_max_faces(value, limit: int) -> int:
    if value is None or value == "":
        return limit
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ApiError(400, "bad_request", f"max_faces must be a whole number, got {value!r}") from None
    if number < 1 or isinstance(value, float) and value != number:
        raise ApiError(400, "bad_request", f"max_faces must be a whole number of at least 1, got {value!r}")
    return min(number, limit)


async def image_from_request(request: Request, body: bytes) -> tuple[bytes, object]:
    """(encoded image, max_faces as given or None) from a raw image body, a multipart `file` field or JSON
    `{"image": base64}`; anything else is 400 or 415."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type in IMAGE_TYPES:
        return body, request.query_params.get("max_faces")
    if media_type == "application/json":
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError) as error:
            raise ApiError(400, "bad_json", f"the body is not valid JSON: {error}") from None
        if not isinstance(document, dict) or not isinstance(document.get("image"), str):
            raise ApiError(400, "bad_json", 'expected a JSON object {"image": "<base64>"}')
        try:
            data = base64.b64decode(document["image"].split(",", 1)[-1] if document["image"].startswith("data:") else document["image"], validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "bad_base64", "the image field is not valid base64") from None
        return data, document.get("max_faces", request.query_params.get("max_faces"))
    if media_type == "multipart/form-data":
        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
        except Exception as error:
            raise ApiError(400, "bad_multipart", f"the multipart body cannot be parsed: {error}") from None
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "bad_multipart", "expected the image in a multipart file field named 'file'")
        part_type = (upload.content_type or "").split(";")[0].strip().lower()
        if part_type and part_type not in IMAGE_TYPES and part_type != "application/octet-stream":
            raise ApiError(415, "unsupported_media_type", f"{part_type} is not supported; send {', '.join(IMAGE_TYPES)}")
        return await upload.read(), form.get("max_faces", request.query_params.get("max_faces"))
    raise ApiError(
        415, "unsupported_media_type",
        f"Content-Type {media_type or '(none)'} is not supported; send {', '.join(IMAGE_TYPES)}, "
        "multipart/form-data (field 'file') or application/json ({\"image\": base64})",
    )


def face_json(face, bins: list[float]) -> dict:
    answer = {
        "box": [round(float(v), 1) for v in face.box],
        "score": round(face.score, 4),
        "age": round(face.age, 1),
        "landmarks": [[round(float(x), 1), round(float(y), 1)] for x, y in face.landmarks],
    }
    if face.distribution is not None:
        answer["age_distribution"] = {f"{b:g}": round(float(p), 4) for b, p in zip(bins, face.distribution)}
    return answer


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class AgeAPI:
    def __init__(self, finder, predictor, model: dict, crop: dict, api_key_sha256: str | None):
        self.finder, self.predictor = finder, predictor
        self.model = model  # name, version, sha256, bins
        self.crop = CropConfig.from_dict(crop)
        self.api_key_sha256 = api_key_sha256
        self.limits = Limits()  # until reconfigure() gives the user_config
        self.in_flight = 0
        self.ready = False
        self.ready_lock = asyncio.Lock()

    def reconfigure(self, user_config: dict) -> None:
        self.limits = Limits(**user_config)

    def check_key(self, request: Request) -> None:
        if self.api_key_sha256 is None:
            return
        given = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not given or not hmac.compare_digest(hashlib.sha256(given.encode()).hexdigest(), self.api_key_sha256):
            raise ApiError(401, "unauthorized", "a valid API key is required (Authorization: Bearer KEY or X-API-Key)")

    async def infer(self, data: bytes, max_faces: int) -> tuple[CutFaces, tuple[int, int], np.ndarray, np.ndarray | None]:
        found = await self.finder.find.remote(data, self.limits.max_pixels, max_faces)
        if not isinstance(found[0], CutFaces):
            raise ApiError(*found)
        cut, size = found
        ages, distributions = await self.predictor.predict.remote(cut.regions, cut.boxes)
        return cut, size, ages, distributions

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(self) -> HTMLResponse:
        return HTMLResponse(web_page())

    @api.post(
        "/v1/age",
        summary="Ages of every face in a photo",
        description="The photo as the raw body (image/jpeg, image/png, image/webp), as multipart/form-data field "
        "`file`, or as JSON {\"image\": \"<base64>\"}; optional `max_faces` (query, form or JSON field).",
    )
    async def age(self, request: Request) -> JSONResponse:
        from ray.serve.exceptions import BackPressureError

        started = time.perf_counter()
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
                cut, size, ages, distributions = await asyncio.wait_for(self.infer(data, max_faces), self.limits.timeout_s)
            except asyncio.TimeoutError:
                raise ApiError(504, "timeout", f"no answer within {self.limits.timeout_s:g} s") from None
            except BackPressureError:
                raise ApiError(503, "overloaded", "the model is at capacity; retry shortly", {"Retry-After": "1"}) from None
        except ImageError as error:
            raise ApiError(image_error_status(error), error.reason, str(error)) from None
        finally:
            self.in_flight -= 1
        self.ready = True
        (result,) = ages_of([cut], ages, distributions)
        return JSONResponse(
            {
                "faces": [face_json(face, self.model["bins"]) for face in result.faces],
                "n_faces": result.n_faces,
                "image": {"width": size[0], "height": size[1]},
                "model": {k: self.model[k] for k in ("name", "version", "sha256")},
                "request_id": request_id,
                "elapsed_ms": round((time.perf_counter() - started) * 1000, 1),
            }
        )

    @api.get("/healthz", summary="Ready once a real inference through both workers has succeeded")
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
        found = await self.finder.find.remote(cv2.imencode(".png", gray)[1].tobytes(), self.limits.max_pixels, 1)
        if not isinstance(found[0], CutFaces):
            raise RuntimeError(f"the detector failed: {found}")
        region, boxes = cut_region(gray, [24, 24, 72, 72], self.crop)
        ages, _ = await self.predictor.predict.remote(region[None], boxes[None])
        if not (len(ages) == 1 and np.isfinite(ages[0])):
            raise RuntimeError(f"the model gave {ages}")

    @api.get("/v1/stats", summary="Batch sizes seen by the detector and model replicas that answered")
    async def stats(self, request: Request) -> JSONResponse:
        self.check_key(request)
        finder, predictor = await asyncio.gather(self.finder.stats.remote(), self.predictor.stats.remote())
        return JSONResponse({"face_finder": finder, "age_predictor": predictor, "in_flight": self.in_flight})


def worker_device(device: str) -> tuple[str, float]:
    """(device, GPU share per worker replica): 'auto' means CUDA when the Ray cluster has a GPU; on a GPU the
    detector and the model take half of one each, so one GPU holds a pair."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0.0) if ray.is_initialized() else 0.0
    if device == "auto":
        device = "cuda" if gpus > 0 else "cpu"
    if device == "cuda" and gpus <= 0:
        raise ValueError("--device cuda was asked for, but the Ray cluster has no GPU")
    return device, 0.5 if device == "cuda" else 0.0


def build_app(args: dict | ServeConfig):
    """The Serve application (the import path of `serve/*.yaml`: `c3ae_ray.serving:build_app`).

    The model file is read once here and its bytes go to every AgePredictor replica, so replicas on other
    nodes need no shared path; its name, version and crop geometry go to the others.
    """
    cfg = args if isinstance(args, ServeConfig) else ServeConfig.from_args(args)
    model_bytes = storage.read_bytes(cfg.model)
    model, payload = load_model(model_bytes, name=cfg.model)
    crop = model_crop(payload)
    name, version = model_identity(payload, cfg.model)
    model_info = {"name": name, "version": version, "sha256": payload["sha256"], "bins": model.cfg.bins.tolist()}
    key = os.environ.get(API_KEY_ENV)
    device, gpu_share = worker_device(cfg.device)
    batching = {"max_batch_size": cfg.max_batch_size, "batch_wait_timeout_s": cfg.batch_wait_timeout_s}
    # At least twice the batch size (Serve's default of 5 would cap every batch), and never under 32: with
    # fewer, the ingress's router backs off while the worker is full and small batch sizes collapse under load.
    workers_in_flight = max(2 * cfg.max_batch_size, 32)
    finder = FaceFinder.options(
        max_ongoing_requests=workers_in_flight, ray_actor_options={"num_cpus": 1, "num_gpus": gpu_share}
    ).bind(crop.to_dict(), device, cfg.min_face_score, cfg.detector.to_dict(), **batching)
    predictor = AgePredictor.options(
        max_ongoing_requests=workers_in_flight, ray_actor_options={"num_cpus": 0.5, "num_gpus": gpu_share}
    ).bind(model_bytes, device, **batching)
    return AgeAPI.options(
        user_config=asdict(cfg.limits), max_ongoing_requests=max(256, 2 * cfg.limits.max_in_flight)
    ).bind(finder, predictor, model_info, crop.to_dict(), hashlib.sha256(key.encode()).hexdigest() if key else None)


def check_port_free(host: str, port: int) -> None:
    """Fail fast with a clear message: Serve's proxy would otherwise retry binding for a long time."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: ignore closed connections
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ValueError(f"cannot listen on {host}:{port}: {error.strerror}; choose another --port") from None


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


def serve_forever(cfg: ServeConfig) -> dict:
    """`c3ae serve`: the app on an embedded local Ray (or the cluster at RAY_ADDRESS) until Ctrl-C or SIGTERM;
    then Serve and Ray are shut down. Returns what it served."""
    import signal

    from c3ae_ray.runtime import ray_runtime

    check_port_free(cfg.host, cfg.port)
    load_model(storage.read_bytes(cfg.model), name=cfg.model)  # a bad --model fails here, before Ray starts
    url = f"http://{cfg.host}:{cfg.port}"
    started = time.monotonic()
    with ray_runtime():
        # After Ray's start-up, which installs its own SIGTERM handler: Ctrl-C and SIGTERM both shut down
        # cleanly, also when started from a script that ignores SIGINT in background jobs.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            serve.start(http_options={"host": cfg.host, "port": cfg.port})
            serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
            health = wait_until_healthy(url)
            print(f"c3ae serve: ready in {time.monotonic() - started:.0f} s, model {health['model']['name']} "
                  f"{health['model']['version']}", flush=True)
            print(f"  web page  {url}/\n  API       POST {url}/v1/age   (docs: {url}/docs)\n  Ctrl-C stops it.", flush=True)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            print("c3ae serve: shutting down", flush=True)
        finally:
            serve.shutdown()
    return {"url": url, "served_s": round(time.monotonic() - started, 1)}
