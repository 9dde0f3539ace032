"""``reidgen serve``: load a models directory and run the generator service with uvicorn.

Connection hygiene (issue 12) lives here, at the protocol level, where the app cannot see: a
request's head must arrive within ``header_timeout_s`` (a connection that sends half a head, or
nothing, is closed), idle kept-alive connections close after ``keep_alive_s``, and at most
``max_connections`` are open at once (one more is closed at once, before anything is read). A
request body's deadline (``body_timeout_s``) and size are the app's (`GuardMiddleware`).
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
from pathlib import Path

from uvicorn.protocols.http.h11_impl import H11Protocol

from generator_service.http import Settings, create_app
from generator_service.inference.engine import Engine
from reidgen.core.errors import ReidgenError
from reidgen.core.settings import ServiceSettings

log = logging.getLogger("reidgen.service")

API_KEY_ENV = ServiceSettings.env_name("api_key")
MAX_HEAD_BYTES = 64 * 1024  # h11's cap on a request head (and on any other incomplete event)


def read_api_key(api_key_file: str | Path | None = None) -> str | None:
    """The API key from ``api_key_file`` (its first non-empty line), else ``$REIDGEN_API_KEY``, else None."""
    if api_key_file is not None:
        path = Path(api_key_file).expanduser()
        try:
            text = path.read_text()
        except OSError as exc:
            raise ReidgenError(f"cannot read the API key file {path} ({exc.strerror})") from None
        key = next((line.strip() for line in text.splitlines() if line.strip()), "")
        if not key:
            raise ReidgenError(f"the API key file {path} is empty")
        return key
    key = ServiceSettings.from_env().api_key
    return (key.get_secret_value().strip() or None) if key else None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request head and a cap on connections
    (`guarded_protocol` sets the two class attributes)."""

    header_timeout_s: float = 10.0
    max_connections: int = 256

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        if len(self.connections) > self.max_connections:
            log.warning("connection from %s closed: %d connections open, the server takes %d",
                        self.client, len(self.connections) - 1, self.max_connections)
            self.transport.close()
            return
        self._arm()

    def _waiting_for_head(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timeout)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self._waiting_for_head() and not self.transport.is_closing():
            self.transport.close()  # half a head, or none, after header_timeout_s: no request to answer

    def data_received(self, data: bytes) -> None:
        if self._waiting_for_head():
            self._arm()  # the first bytes of a (next) request: its head must be complete in time
        super().data_received(data)
        if not self._waiting_for_head():
            self._disarm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


def guarded_protocol(settings: Settings) -> type[GuardedH11Protocol]:
    return type("GuardedH11", (GuardedH11Protocol,), {"header_timeout_s": settings.header_timeout_s,
                                                      "max_connections": settings.max_connections})


def uvicorn_config(app, settings: Settings, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                   **more):
    """The uvicorn configuration of ``app`` with the connection limits of ``settings`` (what
    `serve` runs, and what the tests run)."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, server_header=False,
                          http=guarded_protocol(settings), timeout_keep_alive=max(1, round(settings.keep_alive_s)),
                          limit_concurrency=settings.max_connections + 1, h11_max_incomplete_event_size=MAX_HEAD_BYTES,
                          **more)


def build_app(models_dir: str | Path, *, api_key: str | None = None, device: str = "auto", max_batch: int = 16,
              max_wait_ms: float = 5.0, queue_size: int = 256, batching: bool = True, mask_provider: str | None = None,
              jobs=None, settings: Settings | None = None, **limits):
    """The app for a models directory; ``limits`` are `Settings` fields (max_body_bytes, max_images,
    max_outputs, max_pixels, max_steps, request_timeout_s, roots, job bounds...), on top of the
    environment's defaults (`Settings.from_env`); the models root is ``models_dir``. ``jobs`` is
    the /v1/jobs backend (the CLI passes the Celery one; this package does not import the
    workers). ``queue_size``: images waiting for the device before 503."""
    if settings is None:
        settings = Settings.from_env(api_key=api_key, batching=batching, models_root=models_dir, **limits)
    engine = Engine.from_models_dir(models_dir, device, max_batch=max_batch, max_wait_ms=max_wait_ms,
                                    queue_size=queue_size, timeout_s=settings.request_timeout_s,
                                    mask_provider=mask_provider)
    return create_app(engine, settings, jobs=jobs)


def serve(models_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key_file: str | Path | None = None,
          *, device: str = "auto", max_batch: int = 16, max_wait_ms: float = 5.0, queue_size: int = 256,
          batching: bool = True, mask_provider: str | None = None, jobs=None, log_level: str = "info",
          **limits) -> None:
    """Serve the DG-Net and CR-GAN checkpoints of ``models_dir`` on ``host:port`` until interrupted.

    Binds 127.0.0.1 unless told otherwise. The API key comes from ``api_key_file`` or
    ``$REIDGEN_API_KEY``; with one, every endpoint but /v1/healthz and /v1/readyz requires it.
    ``limits``: `Settings` fields (None: the default). Models are loaded before the port opens
    (a bad models directory fails here, as a `ReidgenError`); warm-up runs once the server is up,
    and /v1/readyz turns 200 when done.
    """
    import uvicorn

    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_key = read_api_key(api_key_file)
    if not _is_loopback(host) and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach this port can use the service "
                    "(set --api-key-file or %s)", host, API_KEY_ENV)
    settings = Settings.from_env(api_key=api_key, batching=batching, models_root=models_dir, **limits)
    app = build_app(models_dir, device=device, max_batch=max_batch, max_wait_ms=max_wait_ms, queue_size=queue_size,
                    mask_provider=mask_provider, jobs=jobs, settings=settings)
    uvicorn.Server(uvicorn_config(app, settings, host, port, log_level)).run()
