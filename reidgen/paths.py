"""Where the data lives: ``REIDGEN_DATA``, else ``../shared/data`` beside the checkout."""
from __future__ import annotations

import os
from pathlib import Path

from reidgen.errors import ReidgenError

_REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    env = os.environ.get("REIDGEN_DATA")
    return Path(env) if env else (_REPO.parent / "shared" / "data")


def resolve_data(name_or_path: str | Path) -> Path:
    """Accept a folder path, or the name of a data set under the data root (``market1501_mini``)."""
    p = Path(name_or_path).expanduser()
    if p.exists():
        return p
    under_root = data_root() / str(name_or_path)
    if under_root.exists():
        return under_root
    raise ReidgenError(
        f"data folder {name_or_path!s} not found (also looked in {under_root}); pass a "
        "Market-1501 style folder, or a data set name under REIDGEN_DATA"
    )
