"""Where the data lives (``REIDGEN_DATA``, `CommonSettings.data_root`), and names under a server's roots."""
from __future__ import annotations

from pathlib import Path

from reidgen.core.errors import ReidgenError
from reidgen.core.settings import CommonSettings


def data_root() -> Path:
    """``$REIDGEN_DATA``, else ``../shared/data`` beside the checkout."""
    return CommonSettings.from_env().data_root


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


# -- names under a server's roots (issue 12: what an HTTP client may name) ------------------------
class PathNotAllowed(ReidgenError):
    """A name a remote client gave that does not stay inside the server's root for it."""

    code = "path_not_allowed"


_ROOT_OF = {"model": "models root", "data set": "data root", "shards folder": "shards root"}


def _root_word(what: str) -> str:
    return _ROOT_OF.get(what, f"{what} root")


def _refuse(field: str, given: str, what: str, reason: str) -> PathNotAllowed:
    shown = given if len(given) <= 200 else given[:200] + "..."
    message = (f"{field}: {shown!r} {reason}; give the name of a {what} under this server's {_root_word(what)} "
               f"(a relative name without '..'; an absolute path only inside that root)")
    return PathNotAllowed(message, public=message)


def confine(root: str | Path, name: str, field: str, what: str) -> Path:
    """``name`` as a path inside ``root``, or `PathNotAllowed` naming ``field`` and what is allowed.

    Refused: an empty name, a NUL character, any ``..`` component, an absolute path outside the
    root, the root itself, and a name whose symlinks resolve outside the root. The answer is the
    resolved path (so a symlink swapped later cannot lead elsewhere); it need not exist. The
    messages never show the root itself (a remote client learns no server path)."""
    if not isinstance(name, str) or not name.strip():
        raise _refuse(field, str(name), what, "is empty")
    if "\0" in name:
        raise _refuse(field, name.replace("\0", "\\0"), what, "contains a NUL character")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: no file has that name
        raise _refuse(field, name.encode("utf-8", "replace").decode(), what, "is not valid UTF-8 text") from None
    if len(encoded) > 1024 or any(len(part.encode()) > 255 for part in Path(name).parts):
        raise _refuse(field, name, what, "is too long (at most 255 bytes a component, 1024 in all)")
    if ".." in Path(name).parts:
        raise _refuse(field, name, what, "contains '..'")
    base = Path(root).resolve()
    given = Path(name)
    try:
        resolved = (given if given.is_absolute() else base / given).resolve()
    except (OSError, RuntimeError):  # a symlink loop, a name too long
        raise _refuse(field, name, what, "cannot be resolved") from None
    if resolved == base:
        message = (f"{field}: {name!r} names this server's {_root_word(what)} itself; give the name of a {what} "
                   f"inside it")
        raise PathNotAllowed(message, public=message)
    if not resolved.is_relative_to(base):
        outside = given.is_absolute() and not given.resolve().is_relative_to(base)
        raise _refuse(field, name, what, f"{'is' if outside else 'resolves'} outside this server's {_root_word(what)}")
    return resolved


def confine_model(root: str | Path, name: str, field: str) -> Path:
    """A model name under the models root: ``NAME`` (a run folder or a file) or ``NAME.pt``."""
    path = confine(root, name, field, "model")
    if not path.exists() and path.suffix != ".pt":
        with_suffix = confine(root, name + ".pt", field, "model")
        if with_suffix.exists():
            return with_suffix
    return path
