"""A deployment's settings: limits, roots, connection and worker timings."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reidgen.core.errors import ReidgenError
from reidgen.core.settings import REQUEST_TIMEOUT_S, ServiceSettings, WorkerSettings


@dataclass
class Settings:
    """The settings of one deployment, for `reidgen serve` and `reidgen worker` alike (the models
    and batching live in the `Engine`). Flags fill them; `from_env` takes the rest from the
    environment's `WorkerSettings` and `ServiceSettings` (``reidgen/core/settings.py``)."""

    api_key: str | None = None
    max_body_bytes: int = 8 * 2**20
    max_images: int = 16          # input images per request
    max_outputs: int = 64         # generated images per request (grid: appearance × structure)
    max_pixels: int = 1024 * 1024  # per input image; re-id crops are ~128×64
    max_steps: int = 16           # interpolation steps
    request_timeout_s: float = REQUEST_TIMEOUT_S
    batching: bool = True         # False: every request runs alone (same queue, no merging)
    docs: bool = True             # serve /docs (the OpenAPI document is always served)
    # Roots: over HTTP a job names its checkpoint and teacher under models_root, its data sets
    # under data_root and its output folder under shards_root (None: not confined, in-process use).
    models_root: Path | None = None
    data_root: Path | None = None
    shards_root: Path | None = None
    # Jobs: bounded in records, tasks and how many are queued or running at once.
    max_job_records: int = 2_000_000
    max_job_tasks: int = 10_000   # shards of one job (one task each)
    min_shard_size: int = 64      # records per shard, unless the whole job fits in one shard
    # What one shard costs a worker's process: its records (time, manifest) and its device batches
    # (memory: a batch of 4096 DG-Net images took a pool process from 1.3 to 6.9 GB).
    max_shard_size: int = 8192
    max_batch_size: int = 64
    max_active_jobs: int = 16     # jobs queued or running; more → 429
    dispatch_window: int = 64     # tasks queued at submission; each finished shard queues the next
    max_job_body_bytes: int = 64 * 1024
    # JSON bodies: bounded in structure before they are parsed.
    max_json_items: int = 4096    # members, elements and brackets of one body
    max_json_depth: int = 32
    # Connections (uvicorn, generator_service.http.serve): slow clients are closed, connections capped.
    header_timeout_s: float = 10.0  # a request's head must arrive within this
    body_timeout_s: float = 60.0    # its body within this, from the head
    keep_alive_s: float = 5.0       # an idle kept-alive connection is closed after this
    max_connections: int = 256
    # Workers: a running shard renews its lease every heartbeat_s; a lease not renewed for
    # lease_s means its worker is gone, and the shard is queued again.
    heartbeat_s: float = 10.0
    lease_s: float = 30.0

    def __post_init__(self):
        for name in ("models_root", "data_root", "shards_root"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, Path(value).expanduser().resolve())
        if not 0 < self.heartbeat_s < self.lease_s:
            raise ReidgenError(f"heartbeat ({self.heartbeat_s:g} s) must be above 0 and below the lease "
                               f"({self.lease_s:g} s)")

    @property
    def confined(self) -> bool:
        return None not in (self.models_root, self.data_root, self.shards_root)

    @classmethod
    def from_env(cls, worker: WorkerSettings | None = None, **given) -> Settings:
        """Settings with the roots and worker timings of ``worker`` (default: the environment's
        `WorkerSettings`, ``$REIDGEN_MODELS_ROOT``, ``$REIDGEN_DATA``, ``$REIDGEN_SHARDS_ROOT``,
        ``$REIDGEN_HEARTBEAT_S``, ``$REIDGEN_LEASE_S``) and the request deadline of the environment's
        `ServiceSettings` (``$REIDGEN_REQUEST_TIMEOUT_S``), where ``given`` has none."""
        worker = worker or WorkerSettings.from_env()
        defaults: dict[str, Any] = {"models_root": worker.models_root, "data_root": worker.data_root,
                                    "shards_root": worker.shards_root, "heartbeat_s": worker.heartbeat_s,
                                    "lease_s": worker.lease_s,
                                    "request_timeout_s": ServiceSettings.from_env().request_timeout_s}
        return cls(**{**defaults, **{k: v for k, v in given.items() if v is not None}})
