"""Every 4xx body the test suite's apps send, recorded with the request that got it (issue 23, item 2).

`install` wraps `create_app` (where the tests and `reidgen serve` take it from) so that each app
it makes has an outer ASGI layer that keeps, for every 4xx answer, the request's bytes (path,
query, headers, body), the answer's body and the app's roots. `leaks` then lists the answers that
hold a root's path the request did not hold itself: a client learns no server path, but may read
its own words back.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Answer:
    status: int
    request: bytes
    body: bytes
    roots: tuple[str, ...]


RECORDED: list[Answer] = []
# Under pytest-xdist each worker process records its own answers; the leaks it finds are also
# appended here (one line each), so that the controller can check the whole run at its end
# (conftest's `pytest_sessionfinish`).
LEAK_LOG: Path | None = None


def _root_strings(settings) -> tuple[str, ...]:
    found = set()
    for name in ("models_root", "data_root", "shards_root"):
        root = getattr(settings, name, None)
        if root is not None:
            found |= {str(root), str(Path(root).resolve())}
    return tuple(sorted(found))


class Recorder:
    """An ASGI layer that records the 4xx answers of the app inside it."""

    def __init__(self, app, roots: tuple[str, ...]):
        self.app, self.roots = app, roots

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = bytearray(scope.get("raw_path") or scope.get("path", "").encode())
        request += b"?" + scope.get("query_string", b"")
        for key, value in scope.get("headers", []):
            request += b"\n" + key + b": " + value
        body, status = bytearray(), [0]

        async def receiving():
            message = await receive()
            if message["type"] == "http.request":
                request.extend(message.get("body", b""))
            return message

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body" and 400 <= status[0] < 500:
                body.extend(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receiving, sending)
        finally:
            if 400 <= status[0] < 500:
                answer = Answer(status[0], bytes(request), bytes(body), self.roots)
                RECORDED.append(answer)
                _log_leaks(answer)


def recorded(create_app):
    @functools.wraps(create_app)
    def wrapper(engine, settings=None, jobs=None):
        app = create_app(engine, settings, jobs)
        app.add_middleware(Recorder, roots=_root_strings(app.state.settings))
        return app
    wrapper.recording = True
    return wrapper


def install() -> None:
    """Record the answers of every app made from now on (idempotent)."""
    import generator_service.http as package
    import generator_service.http.app as app_module
    import generator_service.http.serve as serve_module

    if getattr(app_module.create_app, "recording", False):
        return
    wrapped = recorded(app_module.create_app)
    for module in (app_module, package, serve_module):
        module.create_app = wrapped


def _log_leaks(answer: Answer) -> None:
    if LEAK_LOG is not None:
        found = leaks([answer])
        if found:
            with LEAK_LOG.open("a") as log:
                log.writelines(line.replace("\n", " ") + "\n" for line in found)


def leaks(answers: list[Answer] | None = None) -> list[str]:
    """The answers whose body holds a root's path that their request did not send."""
    found = []
    for answer in RECORDED if answers is None else answers:
        for root in answer.roots:
            if root.encode() in answer.body and root.encode() not in answer.request:
                found.append(f"{answer.status} {answer.body[:300]!r} holds {root}")
    return found
