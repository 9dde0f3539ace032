"""What a client is told when a request fails: status, stable code, a message in its words,
and the request id that finds the rest in the server log."""
from __future__ import annotations

import logging
import re
import uuid
from typing import get_args

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from api_schemas.jobs import JobKind
from api_schemas.service import ErrorBody, ErrorDetail
from generator_service.http.metrics import Metrics, endpoint_label
from generator_service.inference.engine import (
    DeadlineExceeded,
    EngineError,
    NotReady,
    OutOfMemory,
    QueueFull,
    UnknownModel,
    WrongModelKind,
)
from reidgen.core.errors import ReidgenError, public_message
from reidgen.core.images import ImageTooLarge, UnreadableImage

log = logging.getLogger("reidgen.service")

REQUEST_ID_HEADER = "X-Request-ID"
_SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")


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


def status_of(exc: ReidgenError) -> tuple[int, str]:
    if isinstance(exc, ApiError):
        return exc.status, exc.code
    if isinstance(getattr(exc, "http_status", None), int):  # e.g. the jobs backend's TooManyJobs: 429
        return exc.http_status, exc.code
    for cls, status, code in _STATUS:
        if isinstance(exc, cls):
            return status, code or getattr(exc, "code", "bad_request")
    return 400, "bad_request"


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


def request_id(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


def client_message(exc: ReidgenError) -> str:
    """What a client may read about ``exc``: the app's own wording, or the error's public line."""
    return str(exc) if isinstance(exc, _CLIENT_WORDED) else public_message(exc)


# A discriminated union (a job spec per kind) puts the kind it chose into an error's location:
# the client wrote no field of that name, so the message leaves it out (spec.target, not
# spec.crgan_render.target).
_NOT_FIELDS = frozenset({"body", *get_args(JobKind)})


def validation_message(exc: ValidationError | RequestValidationError) -> str:
    """Pydantic errors as one line: where and what (never the offending value itself)."""
    parts = []
    for err in exc.errors()[:6]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x not in _NOT_FIELDS) or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    more = len(exc.errors()) - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def allowed_methods(request: Request) -> str:
    """The methods of every route at the request's path. Starlette's 405 names only the first
    route's (GET of /v1/jobs/{id}, not its DELETE), though each method is a route of its own."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if route.matches(request.scope)[0] != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods))


def install_error_handlers(app: FastAPI, metrics: Metrics, known: frozenset[str]) -> None:
    def respond(request: Request, status: int, code: str, message: str, headers=None) -> JSONResponse:
        metrics.errors.labels(endpoint_label(request, known), code).inc()
        return error_response(status, code, message, headers, request_id(request))

    @app.exception_handler(ReidgenError)
    async def reidgen_error(request: Request, exc: ReidgenError) -> JSONResponse:
        status, code = status_of(exc)
        rid = request_id(request)
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
        return respond(request, 422, "invalid_request", validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}
        message = {404: f"no endpoint {request.url.path}; see /openapi.json",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": allowed_methods(request)}
        return respond(request, exc.status_code, codes.get(exc.status_code, "http_error"), message, headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        # Logged with its traceback by the server; the client learns only that it failed.
        rid = request_id(request)
        log.error("request %s: unhandled error on %s %s", rid, request.method, request.url.path, exc_info=exc)
        # Answered outside the middleware that stamps responses with the request id: stamp it here.
        return respond(request, 500, "internal_error", "internal server error; see the server log",
                       {REQUEST_ID_HEADER: rid} if rid else None)
