"""Every environment variable reidgen reads, in one place (issue 16): one settings class per kind
of process, each field with its variable's name, type, default and meaning.

- `CommonSettings`: what every process reads (where the data sets and the mask models are).
- `TorchrunSettings`: what ``torchrun`` sets in each process it starts (a trainer's rank).
- `WorkerSettings`: the batch workers and every job client (``reidgen serve``'s /v1/jobs,
  ``reidgen generate --submit``): Redis, the queue, the roots a job names files under, leases.
- `ServiceSettings`: the HTTP service (``reidgen serve``): its API key and request deadline.
- `FlowerSettings`: the Flower monitor of the image (where its logins are).

No module outside this package reads ``os.environ``; the others take these objects (or values
from them) as arguments, and command-line flags override them (``WorkerSettings.from_env(queue=...)``).
A bad value is one `SettingsError` line naming the variable and what it expects. The README's
environment table is `env_table()` (``python -m reidgen.core.settings`` prints it; a test keeps
the two equal).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from reidgen.core.errors import ReidgenError

_CHECKOUT = Path(__file__).resolve().parents[2]
SHARED = _CHECKOUT.parent / "shared"  # the data and models beside the checkout (the development layout)
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
REQUEST_TIMEOUT_S = 30.0  # the one default deadline of a generation request (HTTP service and engine)


class SettingsError(ReidgenError):
    """An environment variable (or the flag standing for it) with a value its setting cannot take."""

    code = "bad_setting"


def _var(name: str, default: Any = ..., meaning: str = "", shown: str | None = None, **constraints) -> Any:
    """A field read from the variable ``name``; ``shown``: the default as the README writes it,
    where the value itself depends on the machine."""
    extra = {"shown_default": shown} if shown else None
    if callable(default):
        return Field(default_factory=default, validation_alias=name, description=meaning, json_schema_extra=extra,
                     **constraints)
    return Field(default, validation_alias=name, description=meaning, json_schema_extra=extra, **constraints)


class _FromEnvironment(BaseSettings):
    # case_sensitive: REDIS_URL, not redis_url; env_ignore_empty: VAR= means "unset", as a shell
    # user expects; validate_by_name: code and flags pass fields by name (queue=...).
    model_config = SettingsConfigDict(case_sensitive=True, env_ignore_empty=True, validate_by_name=True,
                                      extra="ignore", frozen=True)
    @classmethod
    def from_env(cls, **given: Any):
        """The environment's settings, with the fields of ``given`` that are not None (flags) on top."""
        given = {k: v for k, v in given.items() if v is not None}
        try:
            return cls(**given)
        except ValidationError as exc:
            raise SettingsError(_explain(cls, exc, given)) from None

    @classmethod
    def env_name(cls, field: str) -> str:
        return cls.model_fields[field].validation_alias


def _explain(cls: type[_FromEnvironment], exc: ValidationError, given: dict[str, Any]) -> str:
    """One line: the variable (or the field a flag set), the value, pydantic's reason, what the setting is."""
    first = exc.errors()[0]
    key = str(first["loc"][0]) if first["loc"] else ""
    field = next((n for n, f in cls.model_fields.items() if key in (n, f.validation_alias)), key)
    info = cls.model_fields.get(field)
    env = info.validation_alias if info else key
    secret = info is not None and "SecretStr" in str(info.annotation)
    value = "(hidden)" if secret else repr(first.get("input"))
    source = f"{field} ({env})" if field in given else f"environment variable {env}"
    more = f" (and {exc.error_count() - 1} more problem(s))" if exc.error_count() > 1 else ""
    meaning = info.description if info else ""
    return f"{source} = {value}: {first['msg'].lower()}; expected {meaning}{more}"


class CommonSettings(_FromEnvironment):
    """What every process reads."""

    data_root: Path = _var("REIDGEN_DATA", lambda: SHARED / "data",
                           "the folder `--data NAME` and a job's data sets are looked up in",
                           shown="`../shared/data` beside the checkout")
    mask_model: Path | None = _var("REIDGEN_MASK_MODEL", None,
                                   "a MediaPipe `.tflite` person-segmentation model, or a folder holding them "
                                   "(CR-GAN masks)", shown="`../shared/models` beside the checkout")


class TorchrunSettings(_FromEnvironment):
    """Set by ``torchrun`` in each trainer process it starts (unset: one process)."""

    world_size: int = _var("WORLD_SIZE", 1, "how many processes train together; 1 or more", ge=1)
    local_rank: int = _var("LOCAL_RANK", 0, "this process's index on its machine (its GPU); 0 or more", ge=0)
    rank: int = _var("RANK", 0, "this process's index among all of them (0 writes the run folder); 0 or more", ge=0)


class WorkerSettings(CommonSettings):
    """The batch workers (``reidgen worker``) and the job clients (``serve``'s /v1/jobs,
    ``generate --submit``): Redis, the queue, the roots a job names files under, the leases."""

    redis_url: str = _var("REDIS_URL", DEFAULT_REDIS_URL, "the Redis of the Celery broker and the job records, "
                          "a redis:// or rediss:// URL", min_length=1)
    redis_password_file: Path | None = _var("REDIS_PASSWORD_FILE", None, "a file holding Redis's password "
                                            "(a Docker secret), put into the URL", shown="none")
    redis_ca_file: Path | None = _var("REDIS_CA_FILE", None, "with a rediss:// REDIS_URL: the CA certificate (PEM) "
                                      "Redis's certificate must be signed by (a Docker secret); unset: the system's "
                                      "CAs", shown="none")
    redis_cert_file: Path | None = _var("REDIS_CERT_FILE", None, "with a rediss:// REDIS_URL: this client's "
                                        "certificate (PEM), for a Redis that asks clients for one; with "
                                        "REDIS_KEY_FILE", shown="none")
    redis_key_file: Path | None = _var("REDIS_KEY_FILE", None, "the private key (PEM) of REDIS_CERT_FILE",
                                       shown="none")
    redis_prefix: str = _var("REIDGEN_REDIS_PREFIX", "reidgen:", "the prefix of every Redis key (queues, job "
                             "records), so deployments can share one Redis")
    redis_retry_s: float = _var("REIDGEN_REDIS_RETRY_S", 60.0, "seconds a worker retries a job-record call while "
                                "Redis is unreachable, a number 0 or more", ge=0)
    queue: str = _var("REIDGEN_QUEUE", "reidgen-shards", "the Celery queue of the shards (`QUEUE.redo` beside it)",
                      min_length=1)
    visibility_timeout_s: int = _var("REIDGEN_VISIBILITY_TIMEOUT", 7200, "seconds before Redis hands an "
                                     "unacknowledged shard out again, a whole number above a shard's time limit",
                                     gt=0)
    seconds_per_image: float = _var("REIDGEN_SECONDS_PER_IMAGE", 2.0, "a shard's time budget per image, seconds "
                                    "above 0 (its time limit is 120 s plus this per image)", gt=0)
    models_root: Path = _var("REIDGEN_MODELS_ROOT", Path("models"), "the folder a job's checkpoint and teacher "
                             "are named under", shown="`./models`")
    shards_root: Path = _var("REIDGEN_SHARDS_ROOT", Path("shards"), "the folder a job's output is named under",
                             shown="`./shards`")
    heartbeat_s: float = _var("REIDGEN_HEARTBEAT_S", 10.0, "seconds between a running shard's lease renewals, "
                              "above 0 and below the lease", gt=0)
    lease_s: float = _var("REIDGEN_LEASE_S", 30.0, "seconds without a renewal after which a shard's worker "
                          "counts as lost and the shard is queued again, above 0", gt=0)
    device: str = _var("REIDGEN_DEVICE", "auto", "the device a worker's pool processes generate on (auto, cpu, "
                       "cuda, cuda:1 ...)", min_length=1)
    torch_threads: int = _var("REIDGEN_TORCH_THREADS", 0, "torch threads per pool process, a whole number "
                              "(0: torch's own choice)", ge=0)

    @property
    def redis_url_is_set(self) -> bool:
        """Whether REDIS_URL (or the field) was given, not defaulted: `serve` turns /v1/jobs on then."""
        return "redis_url" in self.model_fields_set


class ServiceSettings(CommonSettings):
    """The HTTP service (``reidgen serve``); it is a job client too (`WorkerSettings`)."""

    api_key: SecretStr | None = _var("REIDGEN_API_KEY", None, "the key every endpoint but the health probes "
                                     "requires (`--api-key-file` is safer)", shown="none")
    request_timeout_s: float = _var("REIDGEN_REQUEST_TIMEOUT_S", REQUEST_TIMEOUT_S, "seconds a generation "
                                    "request may take, queue included (`serve --timeout`), above 0", gt=0)


class FlowerSettings(_FromEnvironment):
    """Celery's Flower monitor in the image (``docker/flower_config.py``)."""

    auth_file: Path = _var("REIDGEN_FLOWER_AUTH_FILE", Path("/run/secrets/flower_basic_auth"),
                           "the file of Flower's logins, `USER:PASSWORD` lines (the deployment mounts a secret "
                           "there; tests point elsewhere)")


ALL_SETTINGS: tuple[type[_FromEnvironment], ...] = (CommonSettings, TorchrunSettings, WorkerSettings, ServiceSettings,
                                                    FlowerSettings)


def env_names(cls: type[_FromEnvironment]) -> set[str]:
    """The variables ``cls`` reads (its own and its base's)."""
    return {f.validation_alias for f in cls.model_fields.values()}


def _type_word(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) or str(annotation)
    text = text.replace("pathlib.", "").replace("pydantic.types.", "").replace("NoneType", "None")
    return {"float": "number", "int": "whole number", "str": "text", "Path": "path", "Path | None": "path",
            "SecretStr | None": "secret text"}.get(text, text)


def _default_word(info) -> str:
    extra = info.json_schema_extra or {}
    if "shown_default" in extra:
        return extra["shown_default"]
    default = info.default
    if isinstance(default, float) and default.is_integer():
        default = int(default)
    return f"`{default}`"


def env_table() -> str:
    """The README's table of environment variables: one row per variable, in the classes' order."""
    rows = ["| variable | setting | type | default | meaning |", "|---|---|---|---|---|"]
    seen: set[str] = set()
    for cls in ALL_SETTINGS:
        for field, info in cls.model_fields.items():
            name = info.validation_alias
            if name in seen:  # inherited: listed with the class that declares it
                continue
            seen.add(name)
            rows.append(f"| `{name}` | `{cls.__name__}.{field}` | {_type_word(info.annotation)} | "
                        f"{_default_word(info)} | {info.description} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(env_table())
