"""`/v1/models`, `/v1/healthz`, `/v1/readyz`, `/v1/metrics`: what is served and how it is doing."""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api_schemas.service import HealthResponse, ModelsResponse, ReadyResponse
from generator_service.http.metrics import Metrics
from generator_service.http.openapi import OPEN_ERRORS, SERVICE_ERRORS, error_docs
from generator_service.http.parsing import Service
from generator_service.inference.kinds import PRESETS


def add_status_routes(app: FastAPI, service: Service, metrics: Metrics) -> None:
    engine, settings = service.engine, service.settings

    @app.get("/v1/models", response_model=ModelsResponse, tags=["service"], responses=error_docs(*SERVICE_ERRORS))
    async def models() -> ModelsResponse:
        """The loaded models (with checkpoint identities), those refused at start (with why), known
        presets, engine settings and limits."""
        s = settings
        return ModelsResponse(models=engine.model_infos(), refused=engine.refused_infos(), presets=PRESETS,
                              engine=engine.describe(), limits={
            "max_body_bytes": s.max_body_bytes, "max_images": s.max_images, "max_outputs": s.max_outputs,
            "max_pixels": s.max_pixels, "max_steps": s.max_steps, "request_timeout_s": s.request_timeout_s,
            "auth": bool(s.api_key)})

    @app.get("/v1/healthz", response_model=HealthResponse, tags=["service"], responses=error_docs(*OPEN_ERRORS))
    async def healthz() -> HealthResponse:
        """The process answers (no API key needed)."""
        return HealthResponse()

    @app.get("/v1/readyz", response_model=ReadyResponse, tags=["service"],
             responses={503: {"model": ReadyResponse, "description": "not ready yet (or warm-up failed)"},
                        **error_docs(*OPEN_ERRORS)})
    async def readyz() -> JSONResponse:
        """Models loaded and warmed up (no API key needed). A model whose checkpoint was refused at
        start is listed as not ready; the server is ready for the others."""
        refused = list(engine.refused)
        if engine.ready:
            body = ReadyResponse(ready=True, status="ready", models=len(engine.models), refused=refused)
        else:
            failed = engine.warmup_error is not None
            body = ReadyResponse(ready=False, status="failed" if failed else "loading", models=len(engine.models),
                                 detail="warm-up failed (see the server log)" if failed else "warming up",
                                 refused=refused)
        return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)

    @app.get("/v1/metrics", tags=["service"], response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text format"}, **error_docs(*SERVICE_ERRORS)})
    async def metrics_endpoint() -> Response:
        """Prometheus metrics: requests, latencies, batch sizes, queue depth, errors."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
