"""The HTTP API of `c3ae serve` without Ray: its settings, the FastAPI app with its error envelope, and the
request parsing and answer shapes. `serving` binds it to Ray Serve's deployments.

Every error is `{"error": {"code", "message"}}` with its HTTP status, never a traceback.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import logging
import os
import re
from collections import deque
from dataclasses import dataclass, field
from importlib import resources

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from c3ae_ray.config import check
from c3ae_ray.detect import DetectorConfig
from c3ae_ray.images import DEFAULT_MAX_PIXELS
from c3ae_ray.model import BUNDLED_MODEL

logger = logging.getLogger("ray.serve")

API_KEY_ENV = "C3AE_API_KEY"  # when set where the app is built, /v1/* needs `Authorization: Bearer KEY` or `X-API-Key`
MODEL_ENV = "C3AE_MODEL"  # the model when the Serve config's args give none
IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp")


def default_model() -> str:
    """The model when none is given: $C3AE_MODEL when set, else the one bundled with the package."""
    return os.environ.get(MODEL_ENV) or str(BUNDLED_MODEL)


@dataclass(frozen=True)
class Limits:
    """What one ingress replica accepts; its `user_config`, so `serve deploy` can change it in place."""

    max_body_bytes: int = 10_000_000  # 10 MB; a larger body is a 413 before it is read
    max_pixels: int = DEFAULT_MAX_PIXELS  # width x height from the image header; over it: 413, never decoded
    max_in_flight: int = 64  # requests one ingress replica holds at once; the next one gets 503 at once
    timeout_s: float = 30.0  # a request still unanswered after this gets 504 (on CPUs: not yet in a batch; a batch that has started answers)
    max_faces: int = 100  # the most faces one answer carries (a request's max_faces may only lower it)

    def __post_init__(self):
        check(min(self.max_body_bytes, self.max_pixels, self.max_in_flight, self.max_faces) >= 1 and self.timeout_s > 0,
              "limits must be positive")


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class ServeConfig:
    model: str | None = None  # a model.pt (path or s3://); None: $C3AE_MODEL, else the bundled model
    device: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    # `c3ae serve`'s terminal: Ray Serve's own lines from this level (INFO brings back a line per request and
    # call), and one line of traffic every `stats_interval_s` seconds in which requests came (0: none)
    log_level: str = "WARNING"
    stats_interval_s: float = 10.0
    max_batch_size: int = 16  # requests per detector or model batch
    # Where inference runs: None means two workers behind the ingress on GPUs (detector, then model: each batches
    # and scales on its own) and the ingress itself on CPUs (the whole path in each replica: no hop); True or
    # False chooses
    split_workers: bool | None = None
    # Replicas where the Serve config gives no autoscaling; None: one per CPU of the Ray (at most 8) for the
    # ingress that runs the whole path, one each for two workers
    replicas: int | None = None
    # How long a batch waits to fill. 0: a batch is the requests that queued while the last one ran, so a lone
    # request never waits (on CPUs 10 ms cost concurrency 1 a third of its throughput and gained nothing at 8 or
    # 32, docs/benchmarks.md); a GPU config may wait a little for fuller batches
    batch_wait_timeout_s: float = 0.0
    limits: Limits = field(default_factory=Limits)
    detector: DetectorConfig = field(default_factory=DetectorConfig)

    def __post_init__(self):
        check(self.max_batch_size >= 1 and self.batch_wait_timeout_s >= 0, "max_batch_size must be at least 1, batch_wait_timeout_s not negative")
        check(self.replicas is None or self.replicas >= 1, f"replicas must be at least 1, got {self.replicas}")
        check(0 < self.port < 65536, f"port must be 1 to 65535, got {self.port}")
        check(self.log_level in LOG_LEVELS, f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        check(self.stats_interval_s >= 0, f"stats_interval_s must not be negative, got {self.stats_interval_s}")

    @property
    def model_location(self) -> str:
        return self.model or default_model()


class RequestLog:
    """What an ingress replica answered on POST /v1/age: counts since it started, and the status and time of its
    last `keep` answers, each numbered, so that a reader asking for those after number N (`GET /v1/stats?since=N`)
    sees each answer once however often it asks."""

    def __init__(self, keep: int = 10_000):
        self.answered = 0
        self.errors = 0  # answers with a status of 400 or more
        self.recent: deque[tuple[int, int, float]] = deque(maxlen=keep)  # (number, status, milliseconds)

    def record(self, status: int, ms: float) -> None:
        self.answered += 1
        self.errors += status >= 400
        self.recent.append((self.answered, status, round(ms, 1)))

    def since(self, number: int) -> dict:
        return {"answered": self.answered, "errors": self.errors,
                "recent": [[status, ms] for n, status, ms in self.recent if n > number]}


def traffic_line(stats: dict, seconds: float) -> str | None:
    """One line for `c3ae serve`'s terminal from a `RequestLog.since` answer: None when no request came."""
    recent = stats["recent"]
    if not recent:
        return None
    times = sorted(ms for _, ms in recent)
    errors = sum(status >= 400 for status, _ in recent)

    def percentile(q: float) -> float:
        return times[min(len(times) - 1, int(q * len(times)))]

    return (f"c3ae serve: {len(recent)} requests in the last {seconds:g} s ({errors} failed), p50 {percentile(0.5):.0f} ms, "
            f"p99 {percentile(0.99):.0f} ms; {stats['answered']} since the start ({stats['errors']} failed)")


class ApiError(Exception):
    """An answer other than 200: its HTTP status, a stable code and a message for people."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def failure_status(code: str) -> int:
    """The HTTP status of an image failure's code: 413 over the pixel cap, 500 when inference itself failed,
    400 for anything else that is not a usable image."""
    return {"too_large": 413, "inference_error": 500}.get(code, 400)


NO_STORE = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}  # every JSON answer's (`_security_headers`)


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    """The error envelope; it carries the JSON answers' headers itself, since the last-resort handler of an
    unexpected error answers outside the middleware that adds them."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers={**NO_STORE, **(headers or {})})


# FastAPIOffline: FastAPI whose /docs (Swagger UI) and /redoc load their scripts from the package, so the API
# docs work without internet (FastAPI's own load them from a CDN).
api = FastAPIOffline(
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


@api.middleware("http")
async def _security_headers(request: Request, call_next):
    """Every answer: no content-type sniffing; every JSON answer (results, errors, health, stats): never cached,
    since each describes one photo or one moment. The page brings its own policy (`page_headers`)."""
    response = await call_next(request)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    if response.headers.get("content-type", "").startswith("application/json"):
        response.headers.setdefault("Cache-Control", NO_STORE["Cache-Control"])
    return response


@functools.cache
def web_page() -> str:
    return resources.files("c3ae_ray").joinpath("web/index.html").read_text()


@functools.cache
def page_headers() -> dict[str, str]:
    """The page's Content-Security-Policy: nothing may load or run but its own inline script and style (allowed by
    their hashes, taken from the page itself), the photo the user picked (a blob: URL), and requests back to
    this server; no framing, no forms posted elsewhere."""

    def hashes(tag: str) -> str:
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", web_page(), flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'" for body in bodies)

    policy = [
        "default-src 'none'", f"script-src {hashes('script')}", f"style-src {hashes('style')}", "img-src 'self' blob:",
        "connect-src 'self'", "base-uri 'none'", "form-action 'none'", "frame-ancestors 'none'",
    ]
    return {"Content-Security-Policy": "; ".join(policy), "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}


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
    except (TypeError, ValueError, OverflowError):  # OverflowError: JSON's Infinity
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


# The documented answer of POST /v1/age (OpenAPI): gender and p_female are null for a model without the head,
# age_low and age_high (the range holding the model's age_range_coverage of true ages) for a file without a range.
AGE_EXAMPLE = {
    "faces": [{"box": [212.4, 96.0, 391.7, 318.2], "score": 0.9998, "age": 34.2, "age_low": 27.9, "age_high": 41.6,
               "gender": "female", "p_female": 0.9731,
               "landmarks": [[260.1, 181.3], [337.5, 180.2], [300.2, 226.9], [268.4, 268.0], [331.0, 267.1]],
               "age_distribution": {"30": 0.58, "40": 0.42}}],
    "n_faces": 1, "image": {"width": 640, "height": 480},
    "model": {"name": "c3ae_utkface", "version": "2", "sha256": "...", "age_range_coverage": 0.8}, "request_id": "...", "elapsed_ms": 41.5,
}


def face_json(face, bins: list[float]) -> dict:
    answer = {
        "box": [round(float(v), 1) for v in face.box],
        "score": round(face.score, 4),
        "age": round(face.age, 1),
        **{name: None if value is None else round(value, 1) for name, value in (("age_low", face.age_low), ("age_high", face.age_high))},
        "gender": face.gender,
        "p_female": None if face.p_female is None else round(face.p_female, 4),
        "landmarks": [[round(float(x), 1), round(float(y), 1)] for x, y in face.landmarks],
    }
    if face.distribution is not None:
        answer["age_distribution"] = {f"{b:g}": round(float(p), 4) for b, p in zip(bins, face.distribution)}
    return answer
