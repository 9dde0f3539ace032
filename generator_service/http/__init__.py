"""The HTTP service over one inference `Engine`: `create_app(engine, Settings(...), jobs)`.

settings (limits and roots), errors (what a client is told), middleware (API key, body bounds,
request ids), parsing (reading requests), openapi, metrics, routes/ (the endpoints) and app
(the wiring); serve (uvicorn) and client (Python client) use it."""
from generator_service.http.app import create_app
from generator_service.http.routes.jobs import JobsBackend
from generator_service.http.settings import Settings

__all__ = ["JobsBackend", "Settings", "create_app"]
