"""The Celery app of the batch workers (broker: Redis at ``$REDIS_URL``).

Reliability settings, and why:

- ``task_acks_late`` + ``task_reject_on_worker_lost``: a shard's message is acknowledged only
  when the shard is written, so a worker killed mid-shard (SIGKILL, OOM, lost machine) leaves
  the message to be delivered again; the shard task is idempotent, so a redelivery is harmless.
- ``worker_prefetch_multiplier = 1``: a worker holds one shard at a time; the others stay in
  the queue for idle workers.
- the broker's ``visibility_timeout`` (how long an unacknowledged message of a dead worker waits
  before Redis hands it out again; default 2 h, ``$REIDGEN_VISIBILITY_TIMEOUT``) should exceed a
  shard's hard time limit, so a slow but live shard is not duplicated; if it is (a short timeout
  in tests), the duplicate loses the rename race and is discarded. A dead worker's shard does
  not wait for it: its lease runs out and a watchdog queues it again within seconds
  (`worker.jobs`); the old message, when it comes back, finds the shard done.
- time limits are set per task by the submitter from the shard size (`shard_time_limits`).

The variables are fields of `WorkerSettings` (``reidgen/core/settings.py``); ``reidgen worker``
installs its flags over them with `use_settings`. ``$REIDGEN_REDIS_PREFIX`` prefixes every Redis
key (queues and job records), so several deployments or test runs can share one Redis.

A Redis with a password (the compose deployment's): ``$REDIS_PASSWORD_FILE`` names a file holding
it (a Docker secret), and `redis_url` puts it into ``$REDIS_URL``. The password so stays out of
the environment, the compose file and ``docker inspect``; every client (Celery, the job records,
Flower, the health probe) gets its URL from `redis_url`.

A Redis on another host (a worker host of a cluster, ``docs/scaling/index.md``) is reached over
TLS: a ``rediss://`` URL. `redis_url` then always asks for the server's certificate to be checked
(``ssl_cert_reqs=required``; kombu alone would fall back to no check at all), against the CA
certificate of ``$REDIS_CA_FILE`` when set (a lab CA, ``docker/make-ca.sh``), and presents the
client certificate of ``$REDIS_CERT_FILE`` / ``$REDIS_KEY_FILE`` when the server asks for one.
These go into the URL's query, which redis-py and kombu both read, so every client gets them
from the same place as the password. A file that cannot be read, a TLS file with a plain
``redis://`` URL (everything would go in clear), or ``ssl_*`` options written into the URL itself
are refused, each with one message.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from celery import Celery

from reidgen.core.errors import ReidgenError
from reidgen.core.settings import WorkerSettings

REDIS_PASSWORD_FILE_ENV = WorkerSettings.env_name("redis_password_file")
REDIS_CA_FILE_ENV = WorkerSettings.env_name("redis_ca_file")
REDIS_CERT_FILE_ENV = WorkerSettings.env_name("redis_cert_file")
REDIS_KEY_FILE_ENV = WorkerSettings.env_name("redis_key_file")
_installed: WorkerSettings | None = None


def worker_settings() -> WorkerSettings:
    """This process's worker settings: those `use_settings` installed (``reidgen worker``: its
    flags over the environment; its pool processes are forked from it and inherit them), else the
    environment's, read now (so a test's or a job client's environment counts)."""
    return _installed if _installed is not None else WorkerSettings.from_env()


def use_settings(settings: WorkerSettings) -> None:
    """Make ``settings`` this process's worker settings and apply them to `app` (broker, queue,
    key prefix, visibility timeout); before the worker starts, so that its pool inherits them."""
    global _installed
    _installed = settings
    app.conf.update(_celery_conf(settings))


def redis_url(settings: WorkerSettings | None = None) -> str:
    """``$REDIS_URL``, with the password of ``$REDIS_PASSWORD_FILE`` in it when that is set, and
    with a ``rediss://`` URL the TLS options of `with_tls`."""
    settings = settings or worker_settings()
    password_file = settings.redis_password_file
    url = settings.redis_url
    url = with_password(url, read_redis_password(password_file)) if password_file else url
    return with_tls(url, settings.redis_ca_file, settings.redis_cert_file, settings.redis_key_file)


def with_tls(url: str, ca_file: str | Path | None = None, cert_file: str | Path | None = None,
             key_file: str | Path | None = None) -> str:
    """``url`` with the TLS options redis-py and kombu read from its query: for ``rediss://``,
    ``ssl_cert_reqs=required`` always, ``ssl_ca_certs`` (``ca_file``) and ``ssl_certfile`` /
    ``ssl_keyfile`` (``cert_file``, ``key_file``) when given; each file must be readable now, so
    that a worker host with a secret missing stops at once with its name rather than retrying
    the connection forever. A ``redis://`` URL is returned as it is, unless a file is given:
    refused, since nothing would be encrypted."""
    parts = urlsplit(url)
    given = {REDIS_CA_FILE_ENV: ca_file, REDIS_CERT_FILE_ENV: cert_file, REDIS_KEY_FILE_ENV: key_file}
    named = [env for env, path in given.items() if path]
    if parts.scheme != "rediss":
        if named:
            raise ReidgenError(f"{' and '.join(named)} {'is' if len(named) == 1 else 'are'} set but REDIS_URL "
                               f"is not a rediss:// URL, so nothing would be encrypted: use rediss://HOST:PORT/DB")
        return url
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(key.startswith("ssl_") for key, _ in query):
        raise ReidgenError(f"REDIS_URL carries ssl_* options; give the files through {REDIS_CA_FILE_ENV}, "
                           f"{REDIS_CERT_FILE_ENV} and {REDIS_KEY_FILE_ENV} only")
    if bool(cert_file) != bool(key_file):
        raise ReidgenError(f"{REDIS_CERT_FILE_ENV} and {REDIS_KEY_FILE_ENV} go together: set both or neither")
    tls = [("ssl_cert_reqs", "required")]
    for env, key in ((REDIS_CA_FILE_ENV, "ssl_ca_certs"), (REDIS_CERT_FILE_ENV, "ssl_certfile"),
                     (REDIS_KEY_FILE_ENV, "ssl_keyfile")):
        path = given[env]
        if path:
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise ReidgenError(f"cannot read {path}, which {env} names ({exc.strerror}); a rediss:// "
                                   f"REDIS_URL needs it readable (docker/make-ca.sh makes the files)") from None
            tls.append((key, str(path)))
    return urlunsplit(parts._replace(query=urlencode(query + tls, quote_via=quote, safe="/")))


def read_redis_password(path: str | Path) -> str:
    """The password in ``path``: its text without the final newline, as the redis service reads
    it (``$(cat FILE)``). Spaces, tabs, CR or a second line would make the two readings differ,
    and an empty password would silently mean none: all refused, with how to make a good one."""
    try:
        raw = Path(path).read_bytes()  # bytes: a CR must count, as it does for the shell
    except OSError as exc:
        raise ReidgenError(f"cannot read the Redis password file {path} ({exc.strerror}); "
                           f"{REDIS_PASSWORD_FILE_ENV} must name a readable file") from None
    try:
        password = raw.decode("utf-8").rstrip("\n")
    except UnicodeDecodeError:
        password = ""
    if not password or any(c.isspace() for c in password):
        raise ReidgenError(f"the Redis password file {path} must hold one line of text without spaces (make one "
                           f"with: python3 -c \"import secrets; print(secrets.token_urlsafe(32))\" > {path})")
    return password


def with_password(url: str, password: str) -> str:
    """``url`` with ``password`` in it, percent-encoded (Celery and redis-py decode it). A URL that
    already has one is refused rather than overridden: two sources of one password drift apart."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ReidgenError(f"{REDIS_PASSWORD_FILE_ENV} needs a redis:// or rediss:// REDIS_URL, "
                           f"not {parts.scheme or 'one without a scheme'}")
    if parts.password is not None:
        raise ReidgenError(f"REDIS_URL carries a password and {REDIS_PASSWORD_FILE_ENV} is set too; "
                           f"keep the password in the file only")
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:{quote(password, safe='')}@{host}"))


def key_prefix() -> str:
    return worker_settings().redis_prefix


def redis_retry_s() -> float:
    """How long a worker keeps retrying a call to a job record while Redis is unreachable (a
    restart, a failover) before the shard fails with ``job_store_unavailable``:
    ``$REIDGEN_REDIS_RETRY_S``, default 60 s."""
    return worker_settings().redis_retry_s


def queue_name() -> str:
    return worker_settings().queue


def redo_queue_name() -> str:
    """Where the shards of lost workers are queued again. Workers consume it beside the main queue
    and Celery's Redis transport alternates between the two, so a redone shard is taken by the
    next free worker instead of waiting behind every queued shard."""
    return f"{queue_name()}.redo"


def shard_time_limits(shard_size: int) -> tuple[int, int]:
    """(soft, hard) seconds for one shard: a fixed start-up allowance plus a per-image budget."""
    soft = int(120 + shard_size * worker_settings().seconds_per_image)
    return soft, soft + 60


def _celery_conf(settings: WorkerSettings) -> dict[str, Any]:
    """What of the Celery configuration comes from the worker settings."""
    return {
        "broker_url": redis_url(settings),
        "task_default_queue": settings.queue,
        "broker_transport_options": {"visibility_timeout": settings.visibility_timeout_s,
                                     "global_keyprefix": settings.redis_prefix},
    }


def make_app(settings: WorkerSettings | None = None) -> Celery:
    """The Celery app, configured from ``settings`` (default: `worker_settings`)."""
    app = Celery("reidgen", include=["worker.tasks"])
    max_hard = 24 * 3600
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,           # progress lives in the job record (worker.jobs), not results
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        # Upper bounds; each task gets limits sized to its shard when it is sent.
        task_soft_time_limit=max_hard - 60,
        task_time_limit=max_hard,
        **_celery_conf(settings or worker_settings()),
    )
    return app


app = make_app()
