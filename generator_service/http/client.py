"""A small Python client of the generator service, speaking the `api_schemas.service` models.

    with ServiceClient("http://127.0.0.1:8000", api_key=...) as client:
        result = client.swap(["a.jpg"], ["b.jpg", "c.jpg"])          # SwapResponse
        pictures = [decode_b64(im.image) for im in result.images]    # PIL images
        sheet = client.swap_image(["a.jpg"], ["b.jpg"], mode="grid")  # one PIL image

    ServiceClient(url).wait_ready(timeout=120)  # a service just started: until its models are warm

Images may be given as paths, raw encoded bytes or PIL images. Errors come back as
`ServiceError` with the server's status, code and message (and Retry-After for 503s).
It needs httpx and Pillow, not torch.
"""
from __future__ import annotations

import base64
import io
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import httpx
from PIL import Image

from api_schemas.service import (
    ErrorBody,
    HealthResponse,
    InterpolateRequest,
    InterpolateResponse,
    ModelsResponse,
    ReadyResponse,
    RenderRequest,
    RenderResponse,
    SwapRequest,
    SwapResponse,
)

ImageLike = str | Path | bytes | Image.Image


class ServiceError(Exception):
    """An error response of the service."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after


def image_bytes(image: ImageLike) -> bytes:
    """Encoded bytes of an image given as a path, bytes or a PIL picture (sent as PNG)."""
    if isinstance(image, bytes):
        return image
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    return Path(image).read_bytes()


def encode_b64(image: ImageLike) -> str:
    return base64.b64encode(image_bytes(image)).decode("ascii")


def decode_b64(data: str) -> Image.Image:
    """A base64 image of a response → a PIL picture."""
    with Image.open(io.BytesIO(base64.b64decode(data))) as im:
        im.load()
        return im.copy()


class ServiceClient:
    """Blocking client; one connection pool per instance (use as a context manager, or `close`)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None):
        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout,
                                  transport=transport)

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- plumbing ------------------------------------------------------------------------------
    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code < 400:
            return response
        retry = response.headers.get("Retry-After")
        try:
            err = ErrorBody.model_validate_json(response.content).error
            code, message = err.code, err.message
        except ValueError:
            code, message = "http_error", response.text[:200]
        raise ServiceError(response.status_code, code, message, float(retry) if retry else None)

    def _post(self, path: str, body: dict, timeout_ms: int | None) -> httpx.Response:
        headers = {"X-Timeout-Ms": str(timeout_ms)} if timeout_ms else None
        return self._check(self._http.post(path, json=body, headers=headers))

    # -- endpoints -----------------------------------------------------------------------------
    def swap(self, appearance: Sequence[ImageLike], structure: Sequence[ImageLike],
             mode: Literal["pairs", "grid"] = "pairs", model: str | None = None, multipart: bool = False,
             timeout_ms: int | None = None) -> SwapResponse:
        """DG-Net swap (JSON with base64 images, or with ``multipart`` the files as a form)."""
        if multipart:
            files = [(field, (f"{field}{i}", image_bytes(im), "application/octet-stream"))
                     for field, images in (("appearance", appearance), ("structure", structure))
                     for i, im in enumerate(images)]
            data = {"mode": mode, **({"model": model} if model else {})}
            headers = {"X-Timeout-Ms": str(timeout_ms)} if timeout_ms else None
            response = self._check(self._http.post("/v1/swap", files=files, data=data, headers=headers))
        else:
            req = SwapRequest(appearance=[encode_b64(i) for i in appearance],
                              structure=[encode_b64(i) for i in structure], mode=mode, model=model)
            response = self._post("/v1/swap", req.model_dump(exclude_none=True), timeout_ms)
        return SwapResponse.model_validate_json(response.content)

    def swap_image(self, appearance: Sequence[ImageLike], structure: Sequence[ImageLike],
                   mode: Literal["pairs", "grid"] = "pairs", model: str | None = None,
                   format: Literal["png", "jpeg"] = "png", timeout_ms: int | None = None) -> Image.Image:
        """The swap as one tiled picture (rows = appearance, columns = structure in grid mode)."""
        req = SwapRequest(appearance=[encode_b64(i) for i in appearance], structure=[encode_b64(i) for i in structure],
                          mode=mode, model=model, format=format)
        return _picture(self._post("/v1/swap", req.model_dump(exclude_none=True), timeout_ms))

    def render(self, source: ImageLike, target: ImageLike, target_mask: ImageLike | None = None,
               model: str | None = None, timeout_ms: int | None = None) -> RenderResponse:
        """CR-GAN: the source person rendered into the target's context (and the context mask)."""
        req = RenderRequest(source=encode_b64(source), target=encode_b64(target), model=model,
                            target_mask=encode_b64(target_mask) if target_mask is not None else None)
        return RenderResponse.model_validate_json(self._post("/v1/render", req.model_dump(exclude_none=True),
                                                             timeout_ms).content)

    def interpolate(self, first: ImageLike, second: ImageLike, steps: int = 8,
                    what: Literal["appearance", "structure"] = "appearance", model: str | None = None,
                    timeout_ms: int | None = None) -> InterpolateResponse:
        req = InterpolateRequest(first=encode_b64(first), second=encode_b64(second), steps=steps, what=what,
                                 model=model)
        return InterpolateResponse.model_validate_json(self._post("/v1/interpolate", req.model_dump(exclude_none=True),
                                                                  timeout_ms).content)

    def models(self) -> ModelsResponse:
        return ModelsResponse.model_validate_json(self._check(self._http.get("/v1/models")).content)

    def health(self) -> HealthResponse:
        return HealthResponse.model_validate_json(self._check(self._http.get("/v1/healthz")).content)

    def ready(self) -> ReadyResponse:
        """Readiness (a not-ready server answers 503 with the same body: no exception)."""
        return ReadyResponse.model_validate_json(self._http.get("/v1/readyz").content)

    def wait_ready(self, timeout: float = 60.0, interval: float = 0.1) -> ReadyResponse:
        """Poll /v1/readyz every ``interval`` seconds until it answers 200, and return that answer.

        No answer (connection refused: the server is still starting) and 503 "loading" count as
        "not yet"; after ``timeout`` seconds, `TimeoutError` names the URL and the last status or
        error seen. A 503 "failed" (warm-up failed: the server will not become ready by itself)
        or any other error status raises `ServiceError` at once rather than waiting it out.
        """
        url = self._http.build_request("GET", "/v1/readyz").url
        limit = self._http.timeout.read  # the client's own bound on one request (None: none)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                # A probe never outlives the deadline, so a hung connection cannot overrun it.
                response = self._http.get("/v1/readyz", timeout=max(0.01, min(remaining, limit or remaining)))
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                if response.status_code == 200:
                    return ReadyResponse.model_validate_json(response.content)
                if response.status_code != 503:
                    self._check(response)  # raises for 4xx/5xx: waiting would not fix a wrong URL or a crash
                last = _not_ready(response)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{url} was not ready after {timeout:g} s (last: {last})")
            time.sleep(min(interval, remaining))

    def metrics(self) -> str:
        return self._check(self._http.get("/v1/metrics")).text


def _picture(response: httpx.Response) -> Image.Image:
    with Image.open(io.BytesIO(response.content)) as im:
        im.load()
        return im.copy()


def _not_ready(response: httpx.Response) -> str:
    """What a not-yet-ready answer of /v1/readyz said; `ServiceError` if warm-up failed."""
    if response.status_code != 503:
        return f"HTTP {response.status_code}"
    try:
        body = ReadyResponse.model_validate_json(response.content)
    except ValueError:  # a 503 that is not the service's own (a proxy in front of it, say)
        return f"HTTP 503: {response.text[:200]}"
    if body.status == "failed":
        raise ServiceError(503, "not_ready", body.detail or "warm-up failed")
    return f"HTTP 503 {body.status}" + (f" ({body.detail})" if body.detail else "")
