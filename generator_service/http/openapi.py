"""The OpenAPI document: FastAPI's, plus the hand-parsed request bodies, error responses and auth."""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from api_schemas.jobs import JobRequest
from api_schemas.service import ErrorBody, InterpolateRequest, RenderRequest, SwapForm, SwapRequest
from generator_service.http.middleware import OPEN_PATHS
from generator_service.http.settings import Settings

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


def error_docs(*statuses: int) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {}
    for s in statuses:
        out[s] = {"model": ErrorBody, "description": _ERROR_TEXT[s]}
        if s in (429, 503):
            out[s]["headers"] = _RETRY_AFTER
    return out


GENERATE_ERRORS = (400, 401, 404, 408, 413, 415, 422, 500, 503, 504)
IMAGE_CONTENT = {"image/png": {"schema": {"type": "string", "format": "binary"}},
                  "image/jpeg": {"schema": {"type": "string", "format": "binary"}}}
_REQUEST_MODELS = (SwapRequest, SwapForm, RenderRequest, InterpolateRequest, JobRequest)


def request_body(json_model: type[BaseModel], form_model: type[BaseModel] | None = None) -> dict:
    content: dict[str, Any] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{json_model.__name__}"}}}
    if form_model is not None:
        content["multipart/form-data"] = {"schema": {"$ref": f"#/components/schemas/{form_model.__name__}"}}
    return {"requestBody": {"required": True, "content": content}}


def build_openapi(app: FastAPI, settings: Settings) -> dict:
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
