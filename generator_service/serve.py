"""``reidgen serve``: load a models directory and run the generator service with uvicorn."""
from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path

from generator_service.app import Settings, create_app
from generator_service.engine import Engine
from reidgen.errors import ReidgenError

log = logging.getLogger("reidgen.service")

API_KEY_ENV = "REIDGEN_API_KEY"


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
    key = os.environ.get(API_KEY_ENV, "").strip()
    return key or None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_app(models_dir: str | Path, *, api_key: str | None = None, device: str = "auto", max_batch: int = 16,
              max_wait_ms: float = 5.0, queue_size: int = 64, batching: bool = True, mask_provider: str | None = None,
              jobs=None, **limits):
    """The app for a models directory; ``limits`` are `Settings` fields (max_body_bytes, max_images,
    max_outputs, max_pixels, max_steps, request_timeout_s). ``jobs`` is the /v1/jobs backend (the
    CLI passes the Celery one; this package does not import the workers)."""
    settings = Settings(api_key=api_key, batching=batching, **limits)
    engine = Engine.from_models_dir(models_dir, device, max_batch=max_batch, max_wait_ms=max_wait_ms,
                                    queue_size=queue_size, timeout_s=settings.request_timeout_s,
                                    mask_provider=mask_provider)
    return create_app(engine, settings, jobs=jobs)


def serve(models_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key_file: str | Path | None = None,
          *, device: str = "auto", max_batch: int = 16, max_wait_ms: float = 5.0, queue_size: int = 64,
          batching: bool = True, max_body_bytes: int = 8 * 2**20, max_images: int = 16, max_outputs: int = 64,
          max_pixels: int = 1024 * 1024, max_steps: int = 16, request_timeout_s: float = 30.0,
          mask_provider: str | None = None, jobs=None, log_level: str = "info") -> None:
    """Serve the DG-Net and CR-GAN checkpoints of ``models_dir`` on ``host:port`` until interrupted.

    Binds 127.0.0.1 unless told otherwise. The API key comes from ``api_key_file`` or
    ``$REIDGEN_API_KEY``; with one, every endpoint but /v1/healthz and /v1/readyz requires it.
    Models are loaded before the port opens (a bad models directory fails here, as a
    `ReidgenError`); warm-up runs once the server is up, and /v1/readyz turns 200 when done.
    """
    import uvicorn

    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_key = read_api_key(api_key_file)
    if not _is_loopback(host) and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach this port can use the service "
                    "(set --api-key-file or %s)", host, API_KEY_ENV)
    app = build_app(models_dir, api_key=api_key, device=device, max_batch=max_batch, max_wait_ms=max_wait_ms,
                    queue_size=queue_size, batching=batching, mask_provider=mask_provider, jobs=jobs,
                    max_body_bytes=max_body_bytes, max_images=max_images, max_outputs=max_outputs,
                    max_pixels=max_pixels, max_steps=max_steps, request_timeout_s=request_timeout_s)
    uvicorn.run(app, host=host, port=port, log_level=log_level, server_header=False,
                # uvicorn's own cap on a single header/event; our body limit is enforced by the app.
                h11_max_incomplete_event_size=64 * 1024)
