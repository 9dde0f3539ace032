"""The one exception type that means "the user gave us something wrong".

Everything raised as `ReidgenError` reaches the user as a single line (CLI: stderr and a
non-zero exit; HTTP: a 4xx JSON body). Anything else is a bug and keeps its traceback.

Two audiences read these errors. The CLI runs in the user's own shell, on the user's own files:
its message may name paths and quote why a file failed to load. A remote client of the service
(an HTTP body, a job record in Redis) must learn neither the server's paths, nor whether a file
it named exists, nor any bytes of it. So an error also carries ``public``: the line written for
a remote client (the field and the value the client gave, never a server path), and ``code``,
stable across versions. An error without ``public`` is told to remote clients only as
`GENERIC_MESSAGE`; its details go to the server log.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

GENERIC_MESSAGE = "the request could not be carried out; the server log has the details"


class ReidgenError(Exception):
    """Bad input: the message says what was wrong and what is expected."""

    code = "bad_request"

    def __init__(self, message: str = "", *, public: str | None = None, code: str | None = None):
        super().__init__(message)
        self.public = public
        if code is not None:
            self.code = code


def public_error(message: str, code: str = "bad_request") -> ReidgenError:
    """An error whose message is already fit for a remote client (it echoes only what the client sent)."""
    return ReidgenError(message, public=message, code=code)


@contextmanager
def about(field: str, code: str, public: str) -> Iterator[None]:
    """Give a `ReidgenError` raised inside a remote client's line: ``"field: public"``.

    The call site knows which field of the request the failing work came from; the code deep
    down (a checkpoint reader, a folder scan) does not, and its message names server paths. An
    error that already has a public line keeps it (the innermost context knows best)."""
    try:
        yield
    except ReidgenError as exc:
        if getattr(exc, "public", None) is None:
            exc.public, exc.code = f"{field}: {public}", code
        raise


def public_message(exc: BaseException) -> str:
    """What a remote client may read about ``exc``."""
    public = getattr(exc, "public", None)
    return public if public else GENERIC_MESSAGE
