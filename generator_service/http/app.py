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
from contextlib import asynccontextmanager

from fastapi import FastAPI

from generator_service.http.errors import install_error_handlers
from generator_service.http.metrics import Metrics
from generator_service.http.middleware import GuardMiddleware
from generator_service.http.openapi import build_openapi
from generator_service.http.parsing import Service
from generator_service.http.routes.generate import add_generate_routes
from generator_service.http.routes.jobs import JobsBackend, add_job_routes
from generator_service.http.routes.status import add_status_routes
from generator_service.http.settings import Settings
from generator_service.inference.engine import Engine
from reidgen.core.errors import ReidgenError


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
    app.openapi = lambda: build_openapi(app, settings)  # type: ignore[method-assign]

    add_generate_routes(app, service)
    if jobs is not None:
        add_job_routes(app, jobs, service)
    add_status_routes(app, service, metrics)

    known = frozenset(r.path for r in app.routes if hasattr(r, "path"))
    install_error_handlers(app, metrics, known)
    app.add_middleware(GuardMiddleware, settings=settings, metrics=metrics, known=known)
    return app


def _warm_up_quietly(engine: Engine) -> None:
    try:
        engine.warm_up()
    except Exception:  # noqa: BLE001 - logged by the engine; /v1/readyz reports "failed"
        return
