"""The outermost ASGI layer: API key, body bounds and deadline, request ids, request metrics."""
from __future__ import annotations

import asyncio
import hmac
import time

from generator_service.http.errors import ApiError, error_response, request_id_of
from generator_service.http.metrics import Metrics, endpoint_label
from generator_service.http.settings import Settings

_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
OPEN_PATHS = frozenset({"/v1/healthz", "/v1/readyz"})  # reachable without the API key (probes)


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
        endpoint = endpoint_label(scope, self.known)
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
