"""A real server for the tests that need one: an app served by uvicorn in a thread, on a free
loopback port, with the connection limits `reidgen serve` gives it (`uvicorn_config`)."""
from __future__ import annotations

import socket
import threading
import time

import httpx
import uvicorn

from generator_service.http import Settings
from generator_service.http.serve import uvicorn_config


class Live:
    """``with Live(app, settings) as live:`` serves ``app`` at ``live.url`` until the block ends."""

    def __init__(self, app, settings: Settings):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(app, settings, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Live:
        self.thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/v1/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError("the server did not start")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()
