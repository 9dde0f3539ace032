"""The generator service: a FastAPI app over one `Engine`.

``create_app(engine, settings)`` builds the ``/v1`` endpoints (swap, render, interpolate,
models, healthz, readyz, metrics). Handlers only parse, bound and encode; generation goes
through the engine's queue and batcher, the same code the workers and trainers call.

Safety (DESIGN.md, "safe to expose"; README, "Exposing the service"): with an API key configured
every endpoint except health/readiness needs it; body bytes (and their arrival time), JSON
structure, images per request, generated images per request and pixels per image are bounded
before any expensive work; a full queue (counted in images) is refused before a body is read; a
job names its files under the server's roots (`Settings`) and is bounded in records, shards and
number; every error is an `ErrorBody` JSON
with a code and a message saying what was wrong, and no stack trace, server path or file bytes
ever reach a client: those go to the log under the request's id (``X-Request-ID``, echoed on
every response and given in every error body). Decoding and encoding run in the thread pool,
never on the event loop.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import re
import time
import uuid
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from fastapi import FastAPI, Header, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from api_schemas.jobs import JobRequest, JobStatus
from api_schemas.service import (
    ErrorBody,
    ErrorDetail,
    GeneratedImage,
    HealthResponse,
    InterpolateRequest,
    InterpolateResponse,
    ModelsResponse,
    ReadyResponse,
    RenderRequest,
    RenderResponse,
    SwapForm,
    SwapRequest,
    SwapResponse,
)
from generator_service.engine import (
    DeadlineExceeded,
    Engine,
    EngineError,
    NotReady,
    OutOfMemory,
    QueueFull,
    ServedModel,
    UnknownModel,
    WrongModelKind,
)
from generator_service.images import (
    ImageTooLarge,
    UnreadableImage,
    decode_image_bytes,
    encode_image,
    image_grid,
    mask_to_pil,
    to_pil,
)
from generator_service.kinds import PRESETS, InterpolateItem, RenderItem, SwapItem
from reidgen.core.settings import REQUEST_TIMEOUT_S, ServiceSettings, WorkerSettings
from reidgen.errors import ReidgenError, public_message

log = logging.getLogger("reidgen.service")

_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
OPEN_PATHS = frozenset({"/v1/healthz", "/v1/readyz"})  # reachable without the API key (probes)
REQUEST_ID_HEADER = "X-Request-ID"
_SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")


@dataclass
class Settings:
    """The settings of one deployment, for `reidgen serve` and `reidgen worker` alike (the models
    and batching live in the `Engine`). Flags fill them; `from_env` takes the rest from the
    environment's `WorkerSettings` and `ServiceSettings` (``reidgen/core/settings.py``)."""

    api_key: str | None = None
    max_body_bytes: int = 8 * 2**20
    max_images: int = 16          # input images per request
    max_outputs: int = 64         # generated images per request (grid: appearance × structure)
    max_pixels: int = 1024 * 1024  # per input image; re-id crops are ~128×64
    max_steps: int = 16           # interpolation steps
    request_timeout_s: float = REQUEST_TIMEOUT_S
    batching: bool = True         # False: every request runs alone (same queue, no merging)
    docs: bool = True             # serve /docs (the OpenAPI document is always served)
    # Roots: over HTTP a job names its checkpoint and teacher under models_root, its data sets
    # under data_root and its output folder under shards_root (None: not confined, in-process use).
    models_root: Path | None = None
    data_root: Path | None = None
    shards_root: Path | None = None
    # Jobs: bounded in records, tasks and how many are queued or running at once.
    max_job_records: int = 2_000_000
    max_job_tasks: int = 10_000   # shards of one job (one task each)
    min_shard_size: int = 64      # records per shard, unless the whole job fits in one shard
    max_active_jobs: int = 16     # jobs queued or running; more → 429
    dispatch_window: int = 64     # tasks queued at submission; each finished shard queues the next
    max_job_body_bytes: int = 64 * 1024
    # JSON bodies: bounded in structure before they are parsed.
    max_json_items: int = 4096    # members, elements and brackets of one body
    max_json_depth: int = 32
    # Connections (uvicorn, generator_service.serve): slow clients are closed, connections capped.
    header_timeout_s: float = 10.0  # a request's head must arrive within this
    body_timeout_s: float = 60.0    # its body within this, from the head
    keep_alive_s: float = 5.0       # an idle kept-alive connection is closed after this
    max_connections: int = 256
    # Workers: a running shard renews its lease every heartbeat_s; a lease not renewed for
    # lease_s means its worker is gone, and the shard is queued again.
    heartbeat_s: float = 10.0
    lease_s: float = 30.0

    def __post_init__(self):
        for name in ("models_root", "data_root", "shards_root"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, Path(value).expanduser().resolve())
        if not 0 < self.heartbeat_s < self.lease_s:
            raise ReidgenError(f"heartbeat ({self.heartbeat_s:g} s) must be above 0 and below the lease "
                               f"({self.lease_s:g} s)")

    @property
    def confined(self) -> bool:
        return None not in (self.models_root, self.data_root, self.shards_root)

    @classmethod
    def from_env(cls, worker: WorkerSettings | None = None, **given) -> Settings:
        """Settings with the roots and worker timings of ``worker`` (default: the environment's
        `WorkerSettings`, ``$REIDGEN_MODELS_ROOT``, ``$REIDGEN_DATA``, ``$REIDGEN_SHARDS_ROOT``,
        ``$REIDGEN_HEARTBEAT_S``, ``$REIDGEN_LEASE_S``) and the request deadline of the environment's
        `ServiceSettings` (``$REIDGEN_REQUEST_TIMEOUT_S``), where ``given`` has none."""
        worker = worker or WorkerSettings.from_env()
        defaults: dict[str, Any] = {"models_root": worker.models_root, "data_root": worker.data_root,
                                    "shards_root": worker.shards_root, "heartbeat_s": worker.heartbeat_s,
                                    "lease_s": worker.lease_s,
                                    "request_timeout_s": ServiceSettings.from_env().request_timeout_s}
        return cls(**{**defaults, **{k: v for k, v in given.items() if v is not None}})


class ApiError(ReidgenError):
    """A bad request with its HTTP status and stable error code."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code


# Engine and image errors → (HTTP status, code). Order matters: subclasses first.
_STATUS: list[tuple[type[Exception], int, str | None]] = [
    (QueueFull, 503, None), (NotReady, 503, None), (OutOfMemory, 503, None), (DeadlineExceeded, 504, None),
    (UnknownModel, 404, None), (WrongModelKind, 422, None), (ImageTooLarge, 413, "image_too_large"),
    (UnreadableImage, 400, "unreadable_image"), (EngineError, 500, None), (ReidgenError, 400, None),
]
# Errors this app raises with messages written for its clients (they quote only what the client
# sent). Any other `ReidgenError` is told to clients by its ``public`` line only.
_CLIENT_WORDED = (ApiError, EngineError, ImageTooLarge, UnreadableImage, LookupError)


def _status_of(exc: ReidgenError) -> tuple[int, str]:
    if isinstance(exc, ApiError):
        return exc.status, exc.code
    if isinstance(getattr(exc, "http_status", None), int):  # e.g. the jobs backend's TooManyJobs: 429
        return exc.http_status, exc.code
    for cls, status, code in _STATUS:
        if isinstance(exc, cls):
            return status, code or getattr(exc, "code", "bad_request")
    return 400, "bad_request"


class Metrics:
    """Prometheus metrics in a registry of their own (several apps may live in one process)."""

    def __init__(self, engine: Engine):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("reidgen_http_requests_total", "HTTP requests", ["method", "endpoint", "status"],
                                registry=r)
        self.latency = Histogram("reidgen_http_request_duration_seconds", "HTTP request latency", ["endpoint"],
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=r)
        self.errors = Counter("reidgen_http_errors_total", "error responses by code", ["endpoint", "code"], registry=r)
        self.batch_images = Histogram("reidgen_engine_batch_images", "images generated per model call", ["op"],
                                      buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.batch_requests = Histogram("reidgen_engine_batch_requests", "requests merged per model call", ["op"],
                                        buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.batch_seconds = Histogram("reidgen_engine_batch_duration_seconds", "model call duration", ["op"],
                                       buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)
        queue_depth = Gauge("reidgen_engine_queue_depth", "requests waiting for the batcher", registry=r)
        queue_depth.set_function(engine.queue_depth)
        ready = Gauge("reidgen_engine_ready", "1 when the models are loaded and warmed up", registry=r)
        ready.set_function(lambda: float(engine.ready))
        engine.add_observer(self.observe_batch)

    def observe_batch(self, op: str, model: str, images: int, requests: int, seconds: float) -> None:
        self.batch_images.labels(op).observe(images)
        self.batch_requests.labels(op).observe(requests)
        self.batch_seconds.labels(op).observe(seconds)


def _endpoint(request_or_scope: Any, known: frozenset[str]) -> str:
    """The metrics label of a path: a known endpoint, or 'other' (bounded label cardinality)."""
    path = request_or_scope["path"] if isinstance(request_or_scope, dict) else request_or_scope.url.path
    if path.startswith("/v1/jobs/") and "/v1/jobs/{job_id}" in known:
        return "/v1/jobs/{job_id}"
    return path if path in known else "other"


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None,
                   request_id: str | None = None) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(code=code, message=message, request_id=request_id))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def request_id_of(headers: dict[bytes, bytes]) -> str:
    """The client's ``X-Request-ID`` when it is a short plain token (it goes into logs and
    headers, so nothing else is taken), else a fresh one."""
    given = headers.get(REQUEST_ID_HEADER.lower().encode())
    if given is not None and _SANE_REQUEST_ID.fullmatch(given):
        return given.decode("ascii")
    return uuid.uuid4().hex


def _request_id(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


def client_message(exc: ReidgenError) -> str:
    """What a client may read about ``exc``: the app's own wording, or the error's public line."""
    return str(exc) if isinstance(exc, _CLIENT_WORDED) else public_message(exc)


# -- request parsing -----------------------------------------------------------------------------
def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _validation_message(exc: ValidationError | RequestValidationError) -> str:
    """Pydantic errors as one line: where and what (never the offending value itself)."""
    parts = []
    for err in exc.errors()[:6]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    more = len(exc.errors()) - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


# A job's file names: an empty one or one with a NUL is a name the server does not allow (400),
# like one outside its roots, not a malformed request (422).
_PATH_FIELDS = frozenset({"checkpoint", "teacher", "data", "target", "out"})


def _bad_name(err: dict) -> bool:
    loc = err.get("loc", ())
    return err.get("type") in ("nul_in_path", "string_too_short") and bool(loc) and loc[-1] in _PATH_FIELDS


def _validate(cls: type[BaseModel], data: Any, json: bool = False) -> Any:
    try:
        return cls.model_validate_json(data) if json else cls.model_validate(data)
    except ValidationError as exc:
        if all(_bad_name(err) for err in exc.errors()):
            raise ApiError(400, "path_not_allowed", _validation_message(exc)) from None
        raise ApiError(422, "invalid_request", _validation_message(exc)) from None


# A JSON string, its escapes included (unrolled: no per-character alternation, fast on megabytes).
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


def check_json_shape(body: bytes, max_items: int, max_depth: int) -> None:
    """Refuse a JSON body with more than ``max_items`` members, elements and brackets, or nested
    deeper than ``max_depth``, before it is parsed: counting costs milliseconds where parsing and
    validating 600k keys cost seconds of CPU. Base64 images are long strings, not structure."""
    opens = body.count(b"[") + body.count(b"{")
    if opens <= max_depth and opens + body.count(b",") + body.count(b":") <= max_items:
        return  # the common case: no need to look inside the strings
    too_many = ApiError(413, "json_too_complex", f"the JSON body has more than {max_items} members, elements and "
                                                 f"brackets; this server takes at most {max_items}")
    if (body.count(b'"') - body.count(b'\\"')) // 2 > 2 * max_items:
        raise too_many  # every string is a key or a value: that many strings need that many members
    bare = _JSON_STRING.sub(b'""', body)
    opens = bare.count(b"[") + bare.count(b"{")
    tokens = opens + bare.count(b"]") + bare.count(b"}") + bare.count(b",") + bare.count(b":")
    if tokens > max_items:
        raise too_many
    depth = deepest = 0
    for bracket in re.findall(rb"[\[\]{}]", bare):  # at most max_items of them
        depth += 1 if bracket in b"[{" else -1
        deepest = max(deepest, depth)
    if deepest > max_depth:
        raise ApiError(413, "json_too_complex", f"the JSON body nests {deepest} levels deep; this server takes at "
                                                f"most {max_depth}")


def b64_image(text: str, what: str) -> bytes:
    """A base64 string (or ``data:...;base64,`` URL) → bytes; padding optional, whitespace ignored."""
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise ApiError(400, "bad_base64", f"{what}: a data URL must be base64 (data:image/png;base64,...)")
    text = "".join(text.split())
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "bad_base64", f"{what}: not valid base64 (standard alphabet A-Z a-z 0-9 + /, "
                                          f"expected the bytes of a PNG, JPEG, WebP or BMP file)") from None
    if not data:
        raise ApiError(400, "bad_base64", f"{what}: empty image")
    return data


async def _form(request: Request, settings: Settings, file_fields: Sequence[str]) -> dict[str, Any]:
    """A multipart form as a dict: file fields → lists of bytes, other fields → strings."""
    out: dict[str, Any] = {}
    async with request.form(max_files=settings.max_images + 1, max_fields=16, max_part_size=64 * 1024) as form:
        for key in form:
            values = form.getlist(key)
            if key in file_fields:
                out[key] = [await v.read() if isinstance(v, UploadFile) else v.encode() for v in values]
            elif any(isinstance(v, UploadFile) for v in values):
                raise ApiError(422, "invalid_request", f"{key}: expected a text field, got a file")
            else:
                out[key] = values[0] if len(values) == 1 else values
    return out


def _unsupported(media: str) -> ApiError:
    return ApiError(415, "unsupported_media_type",
                    f"content type {media or '(none)'!r} is not accepted; send application/json "
                    f"(base64 images) or multipart/form-data (image files)")


def _require_json(media: str, path: str) -> None:
    if media != "application/json":
        raise ApiError(415, "unsupported_media_type", f"content type {media or '(none)'!r} is not accepted; "
                                                      f"{path} takes application/json (base64 images)")


class Service:
    """The handlers' shared state and helpers (one per app)."""

    def __init__(self, engine: Engine, settings: Settings):
        self.engine, self.settings = engine, settings

    async def parse(self, cls: type[BaseModel], request: Request, generates: bool = True) -> Any:
        """The JSON body of ``request`` as ``cls``. A request that would generate images is refused
        with 503 while the queue is full, before its body is read; the body's structure is
        bounded before it is parsed (in the thread pool, off the event loop)."""
        if generates:
            self.engine.admit(1)
        body = await request.body()
        s = self.settings

        def parse():
            check_json_shape(body, s.max_json_items, s.max_json_depth)
            return _validate(cls, body, True)
        return await run_in_threadpool(parse)

    def timeout(self, header_ms: int | None) -> float:
        t = self.settings.request_timeout_s
        return min(t, header_ms / 1000) if header_ms else t

    def check_counts(self, inputs: int, outputs: int) -> None:
        s = self.settings
        if inputs > s.max_images:
            raise ApiError(413, "too_many_images", f"{inputs} input images; this server takes at most "
                                                   f"{s.max_images} per request")
        if outputs > s.max_outputs:
            raise ApiError(413, "too_many_outputs", f"{outputs} images to generate; this server generates at most "
                                                    f"{s.max_outputs} per request (a grid makes appearance × "
                                                    f"structure images)")

    def picture(self, data: str | bytes, what: str):
        """A base64 string or file bytes → an RGB picture, within the pixel limit."""
        raw = b64_image(data, what) if isinstance(data, str) else data
        return decode_image_bytes(raw, what, self.settings.max_pixels)

    def decode(self, model: ServedModel, named: Sequence[tuple[str, str | bytes]]) -> torch.Tensor:
        """Encoded images → a normalised batch at the model's size (run in the thread pool)."""
        return torch.stack([model.image_tensor(self.picture(data, what)) for what, data in named])

    def decode_mask(self, model: ServedModel, mask: str | None, target) -> tuple[torch.Tensor, str]:
        """The target person mask: the client's, or the model's mask provider's on the target picture."""
        if mask is not None:
            return model.mask_tensor(self.picture(mask, "target_mask")), "client"
        return model.mask_tensor(model.person_mask(target)), model.masks_name or "none"

    async def generate(self, op: str, model: ServedModel, item, timeout_s: float):
        return await self.engine.run(op, model, item, timeout_s, alone=not self.settings.batching)


def image_response(picture, fmt: str, model: ServedModel, rows: int = 1, columns: int = 1) -> Response:
    return Response(encode_image(picture, fmt), media_type=f"image/{fmt}", headers={
        "X-Reidgen-Model": model.name, "X-Reidgen-Checkpoint": model.identity,
        "X-Reidgen-Rows": str(rows), "X-Reidgen-Columns": str(columns)})


def _png_b64(picture) -> str:
    return base64.b64encode(encode_image(picture, "png")).decode("ascii")


# -- OpenAPI documentation helpers ---------------------------------------------------------------
_ERROR_TEXT = {
    400: "bad input: invalid base64, an undecodable image, a malformed form; a job path outside the server's "
         "roots, a job over the server's bounds",
    408: "the request body did not arrive in time",
    401: "missing or wrong API key",
    404: "unknown model or job",
    413: "too large: body bytes, JSON members or depth, images per request, generated images or pixels per image",
    415: "unsupported content type",
    422: "invalid request body or parameters",
    500: "internal error (no details are given to clients)",
    503: "busy (queue full), not ready, or out of accelerator memory; see Retry-After",
    504: "the request's deadline passed before it ran",
    429: "this server runs as many jobs as it takes; see Retry-After",
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {}
    for s in statuses:
        out[s] = {"model": ErrorBody, "description": _ERROR_TEXT[s]}
        if s in (429, 503):
            out[s]["headers"] = _RETRY_AFTER
    return out


_GENERATE_ERRORS = (400, 401, 404, 408, 413, 415, 422, 500, 503, 504)
_IMAGE_CONTENT = {"image/png": {"schema": {"type": "string", "format": "binary"}},
                  "image/jpeg": {"schema": {"type": "string", "format": "binary"}}}
_REQUEST_MODELS = (SwapRequest, SwapForm, RenderRequest, InterpolateRequest, JobRequest)


def _request_body(json_model: type[BaseModel], form_model: type[BaseModel] | None = None) -> dict:
    content: dict[str, Any] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{json_model.__name__}"}}}
    if form_model is not None:
        content["multipart/form-data"] = {"schema": {"$ref": f"#/components/schemas/{form_model.__name__}"}}
    return {"requestBody": {"required": True, "content": content}}


def _openapi(app: FastAPI, settings: Settings) -> dict:
    """FastAPI's document plus the hand-parsed request bodies (JSON and multipart) and auth."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    _, defs = models_json_schema([(m, "validation") for m in _REQUEST_MODELS],
                                 ref_template="#/components/schemas/{model}")
    doc.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
    doc["components"]["securitySchemes"] = {
        "ApiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        "Bearer": {"type": "http", "scheme": "bearer"},
    }
    if settings.api_key:
        for path, ops in doc.get("paths", {}).items():
            for op in ops.values():
                op["security"] = [] if path in OPEN_PATHS else [{"ApiKeyHeader": []}, {"Bearer": []}]
    app.openapi_schema = doc
    return doc


# -- the app ------------------------------------------------------------------------------------
class JobsBackend(Protocol):
    """Where ``/v1/jobs`` sends batch jobs: `worker.jobs.CeleryJobs` (Celery over Redis). Passed in
    by whoever builds the app, so this package does not import the workers."""

    def submit(self, request: JobRequest, settings: Settings) -> str: ...  # names confined to its roots

    def status(self, job_id: str) -> JobStatus: ...  # LookupError for an unknown id

    def cancel(self, job_id: str) -> JobStatus: ...


JOB_ID_PATTERN = r"^[0-9a-f]{32}$"


def create_app(engine: Engine, settings: Settings | None = None, jobs: JobsBackend | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` (and ``/v1/jobs`` through ``jobs``, when given). Its
    lifespan starts the engine's batcher, warms the
    models up in the background (``/v1/readyz`` says when done) and stops the batcher at exit."""
    settings = settings or Settings()
    if jobs is not None and not settings.confined:
        raise ReidgenError("a server with /v1/jobs needs its models, data and shards roots (Settings.models_root, "
                           "data_root, shards_root): a job may name files under them only")
    service = Service(engine, settings)
    metrics = Metrics(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        warm = None
        if not engine.warmed:
            warm = asyncio.create_task(asyncio.to_thread(_warm_up_quietly, engine))
        yield
        if warm is not None:
            await warm
        await asyncio.to_thread(engine.close)

    app = FastAPI(title="reidgen generator service", version="1.0",
                  description="DG-Net appearance/structure swaps and CR-GAN context rendering of person images, "
                              "dynamically batched. Images travel as base64 JSON or multipart files.",
                  lifespan=lifespan, docs_url="/docs" if settings.docs else None, redoc_url=None)
    app.state.engine, app.state.settings, app.state.metrics, app.state.jobs = engine, settings, metrics, jobs
    app.openapi = lambda: _openapi(app, settings)  # type: ignore[method-assign]

    timeout_header = Header(None, alias="X-Timeout-Ms", ge=1, le=3_600_000,
                            description="deadline of this request in milliseconds (capped by the server's)")

    @app.post("/v1/swap", response_model=SwapResponse, tags=["generate"],
              responses={200: {"content": _IMAGE_CONTENT, "description": "generated images"},
                         **_errors(*_GENERATE_ERRORS)},
              openapi_extra=_request_body(SwapRequest, SwapForm))
    async def swap(request: Request, x_timeout_ms: int | None = timeout_header) -> Response:
        """DG-Net appearance × structure swap: pairs, or every combination as a grid."""
        media = _media_type(request)
        if media == "application/json":
            req = await service.parse(SwapRequest, request)
        elif media == "multipart/form-data":
            engine.admit(1)  # 503 before the files are read
            req = _validate(SwapForm, await _form(request, settings, ("appearance", "structure")))
        else:
            raise _unsupported(media)
        service.check_counts(len(req.appearance) + len(req.structure), _swap_outputs(req))
        model = engine.model_for("swap", req.model)
        a, s = await run_in_threadpool(lambda: (service.decode(model, _named("appearance", req.appearance)),
                                                service.decode(model, _named("structure", req.structure))))
        item = SwapItem(a, s, grid=req.mode == "grid")
        out = await service.generate("swap", model, item, service.timeout(x_timeout_ms))
        ia, is_ = item.pairs()
        rows, cols = (len(a), len(s)) if item.grid else (1, item.size)
        flat = out.flatten(0, 1) if item.grid else out
        if req.format != "json":
            cells = [[flat[r * cols + c] for c in range(cols)] for r in range(rows)]
            return await run_in_threadpool(lambda: image_response(image_grid(cells, pad=0), req.format, model,
                                                                  rows, cols))

        def encode() -> SwapResponse:
            images = [GeneratedImage(appearance=int(i), structure=int(j), image=_png_b64(to_pil(x)))
                      for i, j, x in zip(ia, is_, flat)]
            h, w = model.image_size
            return SwapResponse(model=model.name, checkpoint=model.identity, mode=req.mode, rows=rows, columns=cols,
                                width=w, height=h, images=images)
        return JSONResponse((await run_in_threadpool(encode)).model_dump())

    @app.post("/v1/render", response_model=RenderResponse, tags=["generate"],
              responses={200: {"content": _IMAGE_CONTENT, "description": "the rendered image"},
                         **_errors(*_GENERATE_ERRORS)},
              openapi_extra=_request_body(RenderRequest))
    async def render(request: Request, x_timeout_ms: int | None = timeout_header) -> Response:
        """CR-GAN: render the source person into the target image's context."""
        _require_json(_media_type(request), "/v1/render")
        req = await service.parse(RenderRequest, request)
        model = engine.model_for("render", req.model)

        def prepare():
            source, target = service.picture(req.source, "source"), service.picture(req.target, "target")
            mask, mask_source = service.decode_mask(model, req.target_mask, target)
            return torch.stack([model.image_tensor(source), model.image_tensor(target)]), mask, mask_source
        images, mask, mask_source = await run_in_threadpool(prepare)
        rendered, context = await service.generate("render", model, RenderItem(images[:1], images[1:], mask[None]),
                                                   service.timeout(x_timeout_ms))
        if req.format != "json":
            return await run_in_threadpool(lambda: image_response(to_pil(rendered[0]), req.format, model))

        def encode() -> RenderResponse:
            h, w = model.image_size
            return RenderResponse(model=model.name, checkpoint=model.identity, width=w, height=h,
                                  image=_png_b64(to_pil(rendered[0])), context_mask=_png_b64(mask_to_pil(context[0])),
                                  target_mask=mask_source)
        return JSONResponse((await run_in_threadpool(encode)).model_dump())

    @app.post("/v1/interpolate", response_model=InterpolateResponse, tags=["generate"],
              responses={200: {"content": _IMAGE_CONTENT, "description": "the interpolated images"},
                         **_errors(*_GENERATE_ERRORS)},
              openapi_extra=_request_body(InterpolateRequest))
    async def interpolate(request: Request, x_timeout_ms: int | None = timeout_header) -> Response:
        """DG-Net: images along a line between two images' appearance (or structure) codes."""
        _require_json(_media_type(request), "/v1/interpolate")
        req = await service.parse(InterpolateRequest, request)
        if req.steps > settings.max_steps:
            raise ApiError(413, "too_many_outputs", f"steps={req.steps}; this server interpolates at most "
                                                    f"{settings.max_steps} steps")
        service.check_counts(2, req.steps)
        model = engine.model_for("interpolate", req.model)
        x = await run_in_threadpool(service.decode, model, [("first", req.first), ("second", req.second)])
        out = await service.generate("interpolate", model, InterpolateItem(x[:1], x[1:], req.steps, req.what),
                                     service.timeout(x_timeout_ms))
        if req.format != "json":
            return await run_in_threadpool(lambda: image_response(image_grid([list(out)], pad=0), req.format, model,
                                                                  1, len(out)))

        def encode() -> InterpolateResponse:
            h, w = model.image_size
            return InterpolateResponse(model=model.name, checkpoint=model.identity, what=req.what, width=w,
                                       height=h, images=[_png_b64(to_pil(t)) for t in out])
        return JSONResponse((await run_in_threadpool(encode)).model_dump())

    if jobs is not None:
        _add_job_routes(app, jobs, service)

    @app.get("/v1/models", response_model=ModelsResponse, tags=["service"], responses=_errors(401, 500))
    async def models() -> ModelsResponse:
        """The loaded models (with checkpoint identities), known presets, engine settings and limits."""
        s = settings
        return ModelsResponse(models=engine.model_infos(), presets=PRESETS, engine=engine.describe(), limits={
            "max_body_bytes": s.max_body_bytes, "max_images": s.max_images, "max_outputs": s.max_outputs,
            "max_pixels": s.max_pixels, "max_steps": s.max_steps, "request_timeout_s": s.request_timeout_s,
            "auth": bool(s.api_key)})

    @app.get("/v1/healthz", response_model=HealthResponse, tags=["service"], responses=_errors(500))
    async def healthz() -> HealthResponse:
        """The process answers (no API key needed)."""
        return HealthResponse()

    @app.get("/v1/readyz", response_model=ReadyResponse, tags=["service"],
             responses={503: {"model": ReadyResponse, "description": "not ready yet (or warm-up failed)"},
                        **_errors(500)})
    async def readyz() -> JSONResponse:
        """Models loaded and warmed up (no API key needed)."""
        if engine.ready:
            body = ReadyResponse(ready=True, status="ready", models=len(engine.models))
        else:
            failed = engine.warmup_error is not None
            body = ReadyResponse(ready=False, status="failed" if failed else "loading", models=len(engine.models),
                                 detail="warm-up failed (see the server log)" if failed else "warming up")
        return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)

    @app.get("/v1/metrics", tags=["service"], response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text format"}, **_errors(401, 500)})
    async def metrics_endpoint() -> Response:
        """Prometheus metrics: requests, latencies, batch sizes, queue depth, errors."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    known = frozenset(r.path for r in app.routes if hasattr(r, "path"))
    _install_error_handlers(app, metrics, known)
    app.add_middleware(GuardMiddleware, settings=settings, metrics=metrics, known=known)
    return app


def _add_job_routes(app: FastAPI, jobs: JobsBackend, service: Service) -> None:
    """``/v1/jobs``: only on a server given a jobs backend (without one the paths do not exist)."""
    async def job_call(fn, *args) -> JobStatus:
        try:
            return await run_in_threadpool(fn, *args)
        except LookupError as exc:
            raise ApiError(404, "unknown_job", str(exc).strip("'\"")) from None

    job_id_param = PathParam(pattern=JOB_ID_PATTERN, description="the id POST /v1/jobs returned")

    @app.post("/v1/jobs", response_model=JobStatus, status_code=202, tags=["jobs"],
              responses=_errors(400, 401, 408, 413, 415, 422, 429, 500), openapi_extra=_request_body(JobRequest))
    async def submit_job(request: Request) -> JSONResponse:
        """Submit a batch generation job (one Celery task per shard); its progress is at GET /v1/jobs/{id}.
        ``checkpoint`` and ``teacher`` name models under the server's models root, ``data`` and
        ``target`` data sets under its data root, ``out`` a folder under its shards root."""
        _require_json(_media_type(request), "/v1/jobs")
        full = getattr(jobs, "full", None)
        if full is not None and await run_in_threadpool(full, service.settings):  # 429 before the body is read
            busy = ApiError(429, "too_many_jobs", f"this server already runs {service.settings.max_active_jobs} jobs "
                                                  f"(queued or running), as many as it takes; retry when one has "
                                                  f"finished")
            busy.retry_after = 60
            raise busy
        req = await service.parse(JobRequest, request, generates=False)
        # Confines the names, plans the job, checks its bounds: a bad spec fails here (400, 429).
        job_id = await run_in_threadpool(jobs.submit, req, service.settings)
        status = await job_call(jobs.status, job_id)
        return JSONResponse(status.model_dump(), status_code=202, headers={"Location": f"/v1/jobs/{job_id}"})

    @app.get("/v1/jobs/{job_id}", response_model=JobStatus, tags=["jobs"], responses=_errors(401, 404, 422, 500))
    async def job_status(job_id: str = job_id_param) -> JobStatus:
        """Progress of a job: shards done/total, records, images/s, errors."""
        return await job_call(jobs.status, job_id)

    @app.delete("/v1/jobs/{job_id}", response_model=JobStatus, tags=["jobs"],
                responses=_errors(401, 404, 422, 500))
    async def cancel_job(job_id: str = job_id_param) -> JobStatus:
        """Cancel a job: pending shards are dropped, running ones stop at their next batch (finished
        shards stay)."""
        return await job_call(jobs.cancel, job_id)


def _named(field: str, images: Sequence[str | bytes]) -> list[tuple[str, str | bytes]]:
    return [(f"{field}[{i}]", x) for i, x in enumerate(images)]


def _swap_outputs(req: SwapRequest | SwapForm) -> int:
    na, ns = len(req.appearance), len(req.structure)
    return na * ns if req.mode == "grid" else max(na, ns)


def _warm_up_quietly(engine: Engine) -> None:
    try:
        engine.warm_up()
    except Exception:  # noqa: BLE001 - logged by the engine; /v1/readyz reports "failed"
        return


def _install_error_handlers(app: FastAPI, metrics: Metrics, known: frozenset[str]) -> None:
    def respond(request: Request, status: int, code: str, message: str, headers=None) -> JSONResponse:
        metrics.errors.labels(_endpoint(request, known), code).inc()
        return error_response(status, code, message, headers, _request_id(request))

    @app.exception_handler(ReidgenError)
    async def reidgen_error(request: Request, exc: ReidgenError) -> JSONResponse:
        status, code = _status_of(exc)
        rid = _request_id(request)
        if status == 500:  # an engine fault, not the client's: no details
            log.error("request %s: engine error on %s: %s", rid, request.url.path, exc)
            return respond(request, 500, "internal_error", "internal error while generating; see the server log")
        headers = None
        if status in (429, 503):
            headers = {"Retry-After": str(getattr(exc, "retry_after", 1))}
        message = client_message(exc)
        if message != str(exc):  # the client got less than the whole story: the log keeps it
            log.warning("request %s: %s %s refused (%d %s): %s", rid, request.method, request.url.path, status,
                        code, exc)
        return respond(request, status, code, message, headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return respond(request, 422, "invalid_request", _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}
        message = {404: f"no endpoint {request.url.path}; see /openapi.json",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return respond(request, exc.status_code, codes.get(exc.status_code, "http_error"), message,
                       getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        # Logged with its traceback by the server; the client learns only that it failed.
        rid = _request_id(request)
        log.error("request %s: unhandled error on %s %s", rid, request.method, request.url.path, exc_info=exc)
        # Answered outside the middleware that stamps responses with the request id: stamp it here.
        return respond(request, 500, "internal_error", "internal server error; see the server log",
                       {REQUEST_ID_HEADER: rid} if rid else None)


class GuardMiddleware:
    """Outermost checks, before any route runs: API key, body size (declared and streamed; a job's
    body has a smaller bound), the body's deadline (``body_timeout_s`` from the head: 408), and
    the request metrics (so refused requests are counted too). Plain ASGI: it never buffers.

    It also gives every request its id (`request_id_of`), kept in the scope's state for the
    error handlers and log lines, and echoed as ``X-Request-ID`` on every response: a client
    quoting it lets an operator find the details its error body leaves out."""

    def __init__(self, app, settings: Settings, metrics: Metrics, known: frozenset[str]):
        self.app, self.settings, self.metrics, self.known = app, settings, metrics, known
        self._key = settings.api_key.encode() if settings.api_key else None

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        given = headers.get(b"x-api-key")
        if given is None:
            auth = headers.get(b"authorization", b"")
            given = auth[7:].strip() if auth[:7].lower() == b"bearer " else None
        return given is not None and hmac.compare_digest(given, self._key or b"")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = _endpoint(scope, self.known)
        method = scope["method"] if scope["method"] in _METHODS else "other"  # bounded label values
        status = [500]
        started = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        request_id = request_id_of(headers)
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode("ascii"))]}
            await send(message)

        async def refuse(code_status: int, code: str, message: str, headers=None):
            self.metrics.errors.labels(endpoint, code).inc()
            await error_response(code_status, code, message, headers, request_id)(scope, receive, send_status)

        try:
            if self._key is not None and scope["path"] not in OPEN_PATHS and not self._authorized(headers):
                return await refuse(401, "unauthorized", "missing or wrong API key: send it as 'X-API-Key: KEY' "
                                    "or 'Authorization: Bearer KEY'", {"WWW-Authenticate": "Bearer"})
            jobs = scope["path"] == "/v1/jobs"
            limit = self.settings.max_job_body_bytes if jobs else self.settings.max_body_bytes
            declared = headers.get(b"content-length")
            if declared is not None:
                if not declared.isdigit():
                    return await refuse(400, "bad_request", "Content-Length is not a number")
                if int(declared) > limit:
                    return await refuse(413, "body_too_large", f"request body of {int(declared)} bytes; this "
                                                               f"server takes at most {limit}")
            received, body_done = 0, False
            body_timeout = self.settings.body_timeout_s
            deadline = time.monotonic() + body_timeout

            async def limited_receive():
                # The body must arrive within body_timeout_s of the head (a client trickling it, or a
                # chunked body that never ends, is answered 408 and the connection closed).
                nonlocal received, body_done
                if body_done:
                    return await receive()
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    raise ApiError(408, "body_timeout", f"the request body did not arrive within {body_timeout:g} s "
                                                        f"of its head; send it without pauses") from None
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise ApiError(413, "body_too_large", f"request body over {limit} bytes; this server "
                                                              f"takes at most {limit}")
                    body_done = not message.get("more_body", False)
                else:
                    body_done = True
                return message

            await self.app(scope, limited_receive, send_status)
        finally:
            self.metrics.requests.labels(method, endpoint, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
