"""Flower's configuration in the image (``flower --conf=/opt/reidgen/docker/flower_config.py``):
HTTP basic auth from the ``flower_basic_auth`` Docker secret, or no Flower at all.

Flower can revoke tasks, shut workers down and, through its API, send tasks, which run on the
workers: it must never answer without a login. Flower executes this file and takes its
module-level names that are options (``basic_auth``), so a missing, empty or malformed secret
stops Flower here, with one line on stderr, instead of starting it open. (The file is not called
``flowerconfig.py``: a missing file of that default name is silently skipped by Flower.)

The secret holds ``USER:PASSWORD`` (one line per login). ``$REIDGEN_FLOWER_AUTH_FILE``
(`reidgen.core.settings.FlowerSettings`; the Flower image is the reidgen image plus Flower) points
elsewhere (tests/test_deploy.py); the deployment leaves it unset.
"""
from __future__ import annotations

from reidgen.core.settings import FlowerSettings

_MAKE_ONE = ("python3 -c \"import secrets; print('admin:' + secrets.token_urlsafe(24))\" "
             "> secrets/flower_basic_auth")


def _read_logins(path: str) -> list[str]:
    """The ``USER:PASSWORD`` lines of ``path``; SystemExit (Flower does not start) if there are
    none or one is malformed, so that a mistake never means "no login"."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError as exc:
        raise SystemExit(f"flower: cannot read the login file {path} ({exc.strerror}); "
                         f"create it with: {_MAKE_ONE}") from None
    if not lines:
        raise SystemExit(f"flower: the login file {path} is empty; create it with: {_MAKE_ONE}")
    for number, line in enumerate(lines, 1):
        user, colon, password = line.partition(":")
        if not (user and colon and password):
            raise SystemExit(f"flower: line {number} of {path} is not USER:PASSWORD (both non-empty)")
    return lines


basic_auth = _read_logins(str(FlowerSettings.from_env().auth_file))
