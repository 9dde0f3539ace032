"""Checkpoints of a models directory that `serve` refused to load, and why, in words for clients.

Anyone who can write one file in the models directory must not be able to stop the server: a
file that fails to load (a crafted pickle, a foreign file, a broken configuration) is refused
alone, logged with the full story, and listed in ``/v1/models`` with a short reason that names
it relative to the models directory, never by its server path.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from reidgen.core.errors import ReidgenError

MAX_REASON = 200


@dataclass(frozen=True)
class RefusedModel:
    name: str
    checkpoint: str   # relative to the models directory
    reason: str       # one short line, no server path

    def info(self) -> dict:
        return asdict(self)


def refusal_reason(exc: BaseException, path: Path, root: Path) -> str:
    """The first clause of a load error, the file named as ``checkpoint``'s relative name; a
    failure that is not a `ReidgenError` (a bug, a configuration a model cannot be built from) is
    named by its type only."""
    shown = str(path.relative_to(root))
    if not isinstance(exc, ReidgenError):
        return f"{shown} could not be built as a model ({type(exc).__name__}; the server log has the details)"
    text = str(exc)
    for server_path in sorted({str(path), str(path.resolve())}, key=len, reverse=True):
        text = text.replace(server_path, shown)
    text = text.split("; ", 1)[0].split(". ", 1)[0]
    roots = {str(root.resolve())} | ({str(root)} if root.is_absolute() else set())  # relative: too common a word
    if any(r in text for r in roots):  # a path the message names that is not the file: say less
        return f"{shown} is not a checkpoint this server can load (the server log has the details)"
    return text if len(text) <= MAX_REASON else text[:MAX_REASON - 3] + "..."
