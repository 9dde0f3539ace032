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
  in tests), the duplicate loses the rename race and is discarded.
- time limits are set per task by the submitter from the shard size (`shard_time_limits`).

``$REIDGEN_REDIS_PREFIX`` prefixes every Redis key (queues and job records), so several
deployments or test runs can share one Redis.
"""
from __future__ import annotations

import os

from celery import Celery

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_QUEUE = "reidgen-shards"
SECONDS_PER_IMAGE = float(os.environ.get("REIDGEN_SECONDS_PER_IMAGE", "2.0"))  # generous CPU worst case


def redis_url() -> str:
    return os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)


def key_prefix() -> str:
    return os.environ.get("REIDGEN_REDIS_PREFIX", "reidgen:")


def queue_name() -> str:
    return os.environ.get("REIDGEN_QUEUE", DEFAULT_QUEUE)


def shard_time_limits(shard_size: int) -> tuple[int, int]:
    """(soft, hard) seconds for one shard: a fixed start-up allowance plus a per-image budget."""
    soft = int(120 + shard_size * SECONDS_PER_IMAGE)
    return soft, soft + 60


def make_app() -> Celery:
    app = Celery("reidgen", broker=redis_url(), include=["worker.tasks"])
    max_hard = 24 * 3600
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,           # progress lives in the job record (worker.jobs), not results
        task_default_queue=queue_name(),
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        # Upper bounds; each task gets limits sized to its shard when it is sent.
        task_soft_time_limit=max_hard - 60,
        task_time_limit=max_hard,
        broker_transport_options={
            "visibility_timeout": int(os.environ.get("REIDGEN_VISIBILITY_TIMEOUT", "7200")),
            "global_keyprefix": key_prefix(),
        },
    )
    return app


app = make_app()
