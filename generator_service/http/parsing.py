"""Reading requests: media types, bounded JSON, base64 and multipart images, validation,
and the handlers' shared `Service`; writing images back."""
from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from typing import Any

import torch
from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from api_schemas.service import BASE64_BODY, SwapForm, SwapRequest
from generator_service.http.errors import ApiError, validation_message
from generator_service.http.settings import Settings
from generator_service.inference.engine import Engine, ServedModel
from reidgen.core.images import decode_image_bytes, encode_image


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


# A job's file names: an empty one or one with a NUL is a name the server does not allow (400),
# like one outside its roots, not a malformed request (422).
_PATH_FIELDS = frozenset({"checkpoint", "teacher", "data", "target", "out"})


def _bad_name(err: dict) -> bool:
    loc = err.get("loc", ())
    return err.get("type") in ("nul_in_path", "string_too_short") and bool(loc) and loc[-1] in _PATH_FIELDS


def validate(cls: type[BaseModel], data: Any, json: bool = False) -> Any:
    try:
        return cls.model_validate_json(data) if json else cls.model_validate(data)
    except ValidationError as exc:
        if all(_bad_name(err) for err in exc.errors()):
            raise ApiError(400, "path_not_allowed", validation_message(exc)) from None
        raise ApiError(422, "invalid_request", validation_message(exc)) from None


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


_BASE64 = re.compile(BASE64_BODY)


def b64_image(text: str, what: str) -> bytes:
    """A base64 string (or ``data:...;base64,`` URL) → bytes; padding optional, whitespace ignored.
    What it takes is what the OpenAPI document says (`BASE64_IMAGE_PATTERN`), whitespace aside."""
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise ApiError(400, "bad_base64", f"{what}: a data URL must be base64 (data:image/png;base64,...)")
    text = "".join(text.split())
    if not text:
        raise ApiError(400, "bad_base64", f"{what}: empty image")
    if not _BASE64.fullmatch(text):
        raise ApiError(400, "bad_base64", f"{what}: not valid base64 (standard alphabet A-Z a-z 0-9 + /, "
                                          f"expected the bytes of a PNG, JPEG, WebP or BMP file)")
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


async def read_form(request: Request, settings: Settings, file_fields: Sequence[str]) -> dict[str, Any]:
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


def unsupported(media: str) -> ApiError:
    return ApiError(415, "unsupported_media_type",
                    f"content type {media or '(none)'!r} is not accepted; send application/json "
                    f"(base64 images) or multipart/form-data (image files)")


def require_json(media: str, path: str) -> None:
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
            return validate(cls, body, True)
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


def png_b64(picture) -> str:
    return base64.b64encode(encode_image(picture, "png")).decode("ascii")


def named(field: str, images: Sequence[str | bytes]) -> list[tuple[str, str | bytes]]:
    return [(f"{field}[{i}]", x) for i, x in enumerate(images)]


def swap_outputs(req: SwapRequest | SwapForm) -> int:
    na, ns = len(req.appearance), len(req.structure)
    return na * ns if req.mode == "grid" else max(na, ns)


