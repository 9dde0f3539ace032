"""The OpenAPI document: FastAPI's, plus the hand-parsed request bodies, error responses, auth and
the deployment's own limits and models. A client generated from it should never be surprised: every
status a route can answer is listed with its body, and every bound the server checks on one field
alone is in that field's schema (the bounds across fields, such as images per request, are told in
the 413 and 422 descriptions)."""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from api_schemas.jobs import SPEC_OF_KIND, JobRequest
from api_schemas.service import (
    MAX_LIST_IMAGES,
    MAX_STEPS,
    ErrorBody,
    InterpolateRequest,
    RenderRequest,
    SwapForm,
    SwapRequest,
)
from generator_service.http.middleware import OPEN_PATHS
from generator_service.http.settings import Settings
from generator_service.inference.kinds import OP_KIND

_ERROR_TEXT = {
    400: "bad input: invalid base64, an undecodable image, a malformed form or Content-Length; a job path outside "
         "the server's roots, a model or data set it does not have, a job over the server's bounds",
    401: "missing or wrong API key",
    404: "unknown model or job",
    408: "the request body did not arrive in time",
    413: "too large: body bytes, JSON members or depth, images per request (appearance + structure), generated "
         "images (a grid is appearance × structure) or pixels per image",
    415: "unsupported content type",
    422: "invalid request body or parameters (also: mode 'pairs' with lists of different lengths, neither of one)",
    429: "this server runs as many jobs as it takes; see Retry-After",
    500: "internal error (no details are given to clients)",
    503: "busy (queue full), not ready, out of accelerator memory, or the job store unreachable; see Retry-After",
    504: "the request's deadline (X-Timeout-Ms or the server's) passed before its images were made",
}
_HEADERS = {
    401: {"WWW-Authenticate": {"description": "the scheme to authenticate with", "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}},
    503: {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}},
}

# What the guard (middleware.py) answers on every route before the route runs: a malformed
# Content-Length (400), a body too large (413) or too slow (408); any route may fail (500).
GUARD_ERRORS = (400, 408, 413, 500)
OPEN_ERRORS = GUARD_ERRORS  # /v1/healthz, /v1/readyz: no API key
SERVICE_ERRORS = (*GUARD_ERRORS, 401)
GENERATE_ERRORS = (*SERVICE_ERRORS, 404, 415, 422, 503, 504)
JOB_SUBMIT_ERRORS = (*SERVICE_ERRORS, 415, 422, 429, 503)
JOB_ERRORS = (*SERVICE_ERRORS, 404, 422, 503)  # an id not of 32 hex digits: 422; Redis away: 503

IMAGE_CONTENT = {"image/png": {"schema": {"type": "string", "format": "binary"}},
                 "image/jpeg": {"schema": {"type": "string", "format": "binary"}}}
_REQUEST_MODELS = (SwapRequest, SwapForm, RenderRequest, InterpolateRequest, JobRequest)
# X-Timeout-Ms: the bounds the server takes (a lower deadline of its own still wins).
TIMEOUT_MS_MIN, TIMEOUT_MS_MAX = 1, 3_600_000


def error_docs(*statuses: int) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {}
    for s in sorted(set(statuses)):
        out[s] = {"model": ErrorBody, "description": _ERROR_TEXT[s]}
        if s in _HEADERS:
            out[s]["headers"] = _HEADERS[s]
    return out


def request_body(json_model: type[BaseModel], form_model: type[BaseModel] | None = None) -> dict:
    content: dict[str, Any] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{json_model.__name__}"}}}
    if form_model is not None:
        content["multipart/form-data"] = {"schema": {"$ref": f"#/components/schemas/{form_model.__name__}"}}
    return {"requestBody": {"required": True, "content": content}}


def _deployment_limits(schemas: dict[str, Any], s: Settings) -> None:
    """The limits of this server that one field alone can break, in that field's schema (the
    schema's hard caps stay where the server's are higher). A list of swap images holds at most
    max_images - 1 (the other list has one at least) and max_outputs (each image makes one)."""
    per_list = max(1, min(MAX_LIST_IMAGES, s.max_images - 1, s.max_outputs))
    for model in ("SwapRequest", "SwapForm"):
        for field in ("appearance", "structure"):
            schemas[model]["properties"][field]["maxItems"] = per_list
    steps = schemas["InterpolateRequest"]["properties"]["steps"]
    steps["maximum"] = max(steps["minimum"], min(MAX_STEPS, s.max_steps, s.max_outputs))
    for spec in SPEC_OF_KIND.values():
        fields = schemas[spec.__name__]["properties"]
        fields["shard_size"]["maximum"] = min(fields["shard_size"]["maximum"], s.max_shard_size)
        fields["batch_size"]["maximum"] = min(fields["batch_size"]["maximum"], s.max_batch_size)


_MODEL_FIELDS = {"SwapRequest": "swap", "SwapForm": "swap", "RenderRequest": "render",
                 "InterpolateRequest": "interpolate"}


def _served_models(schemas: dict[str, Any], engine) -> None:
    """The names a request may give as ``model``: those of the models this server holds of the kind
    its operation needs. The server refuses any other (404 unknown, 422 of another kind, 503
    refused at start); the document says so first. With none of that kind, ``model`` is null or
    left out (and the request gets 404: no model of that kind is loaded)."""
    for component, op in _MODEL_FIELDS.items():
        names = sorted(name for name, model in engine.models.items() if model.kind == OP_KIND[op])
        field = schemas[component]["properties"]["model"]
        named = [branch for branch in field["anyOf"] if branch.get("type") == "string"]
        field["anyOf"] = [branch for branch in field["anyOf"] if branch not in named]
        if names:
            field["anyOf"] += [{**branch, "enum": names, "examples": names[:1]} for branch in named]


def build_openapi(app: FastAPI, settings: Settings) -> dict:
    """FastAPI's document plus the hand-parsed request bodies (JSON and multipart), auth, and this
    deployment's limits and models."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    _, defs = models_json_schema([(m, "validation") for m in _REQUEST_MODELS],
                                 ref_template="#/components/schemas/{model}")
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(defs.get("$defs", {}))
    _deployment_limits(schemas, settings)
    _served_models(schemas, app.state.engine)
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
