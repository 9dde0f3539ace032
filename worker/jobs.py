"""Job records in Redis (progress of ``POST /v1/jobs``), and submitting a job as Celery tasks.

Keys (under ``$REIDGEN_REDIS_PREFIX``)::

    job:ID          hash: spec, out, state, shards_total, records_planned, created, started, updated,
                    records_done, records_failed, tasks (JSON list of task ids, for revoking)
    job:ID:done     set of finished shard indices (a redelivered shard is counted once)
    job:ID:errors   list of errors, each a `JobError` as JSON (what HTTP clients read: no internals)

A shard's figures are added only when its index first enters the ``done`` set, so duplicates
(redelivered tasks) never double-count.
"""
from __future__ import annotations

import json
import time
import uuid

import redis

from api_schemas.jobs import JobError, JobManifest, JobRequest, JobStatus
from reidgen.errors import GENERIC_MESSAGE, ReidgenError
from worker.celery_app import key_prefix, redis_url, shard_time_limits
from worker.plans import make_plan
from worker.shards import ensure_job_manifest

JOB_TTL_S = 30 * 24 * 3600
MAX_ERRORS = 100


class UnknownJob(ReidgenError, LookupError):
    code = "unknown_job"


class JobStore:
    def __init__(self, client: redis.Redis | None = None, prefix: str | None = None):
        self.r = client or redis.Redis.from_url(redis_url())
        self.prefix = key_prefix() if prefix is None else prefix

    def _key(self, job_id: str, part: str = "") -> str:
        return f"{self.prefix}job:{job_id}{':' + part if part else ''}"

    def create(self, job_id: str, request: JobRequest, shards: int, records: int) -> None:
        now = time.time()
        self.r.hset(self._key(job_id), mapping={
            "spec": request.spec.model_dump_json(), "out": request.out, "state": "queued", "shards_total": shards,
            "records_planned": records, "created": now, "updated": now, "records_done": 0, "records_failed": 0,
            "tasks": "[]"})
        self.r.expire(self._key(job_id), JOB_TTL_S)

    def set_tasks(self, job_id: str, task_ids: list[str]) -> None:
        self.r.hset(self._key(job_id), "tasks", json.dumps(task_ids))

    def state(self, job_id: str) -> str | None:
        value = self.r.hget(self._key(job_id), "state")
        return value.decode() if value is not None else None

    def cancelled(self, job_id: str) -> bool:
        return self.state(job_id) == "cancelled"

    def shard_started(self, job_id: str) -> None:
        key = self._key(job_id)
        self.r.hsetnx(key, "started", time.time())
        # queued → running, but never over a final state (a late redelivery after cancel/done).
        self.r.eval("if redis.call('hget', KEYS[1], 'state') == 'queued' then "
                    "redis.call('hset', KEYS[1], 'state', 'running') end", 1, key)

    def shard_finished(self, job_id: str, index: int, records: int, failed: int) -> None:
        key = self._key(job_id)
        if self.r.sadd(self._key(job_id, "done"), index):
            pipe = self.r.pipeline()
            pipe.hincrby(key, "records_done", records)
            pipe.hincrby(key, "records_failed", failed)
            pipe.hset(key, "updated", time.time())
            pipe.expire(self._key(job_id, "done"), JOB_TTL_S)
            pipe.execute()
        total = int(self.r.hget(key, "shards_total") or 0)
        if self.r.scard(self._key(job_id, "done")) >= total:
            self.r.eval("local s = redis.call('hget', KEYS[1], 'state') "
                        "if s == 'queued' or s == 'running' then redis.call('hset', KEYS[1], 'state', 'done') end",
                        1, key)

    def error(self, job_id: str, error: JobError, fatal: bool = True) -> None:
        """Record ``error`` (written for the job's HTTP clients; the details belong in the worker log)."""
        bounded = error.model_copy(update={"message": error.message[:2000]})  # still JSON when cut
        self.r.rpush(self._key(job_id, "errors"), bounded.model_dump_json())
        self.r.ltrim(self._key(job_id, "errors"), 0, MAX_ERRORS - 1)
        self.r.expire(self._key(job_id, "errors"), JOB_TTL_S)
        if fatal:
            self.r.eval("local s = redis.call('hget', KEYS[1], 'state') "
                        "if s == 'queued' or s == 'running' then redis.call('hset', KEYS[1], 'state', 'failed') end",
                        1, self._key(job_id))

    def status(self, job_id: str) -> JobStatus:
        h = {k.decode(): v.decode() for k, v in self.r.hgetall(self._key(job_id)).items()}
        if not h:
            raise UnknownJob(f"no job {job_id!r}")
        done = self.r.scard(self._key(job_id, "done"))
        records = int(h["records_done"])
        rate = None
        if "started" in h and records:
            rate = records / max(1e-6, float(h["updated"]) - float(h["started"]))
        errors = [_stored_error(e) for e in self.r.lrange(self._key(job_id, "errors"), 0, -1)]
        return JobStatus(id=job_id, state=h["state"], out=h["out"], shards_total=int(h["shards_total"]),
                         shards_done=done, records_planned=int(h["records_planned"]), records_done=records,
                         records_failed=int(h["records_failed"]), images_per_s=rate,
                         errors=[_error_line(e) for e in errors], error_details=errors)

    def cancel(self, job_id: str) -> list[str]:
        """Mark the job cancelled (running shards stop at their next batch, pending ones are
        skipped); return its task ids for revoking."""
        key = self._key(job_id)
        if not self.r.exists(key):
            raise UnknownJob(f"no job {job_id!r}")
        self.r.eval("local s = redis.call('hget', KEYS[1], 'state') "
                    "if s == 'queued' or s == 'running' then redis.call('hset', KEYS[1], 'state', 'cancelled') end",
                    1, key)
        return json.loads(self.r.hget(key, "tasks") or b"[]")


def _stored_error(raw: bytes) -> JobError:
    """A recorded error; one that is not a `JobError` (written by an older worker, with its
    traceback and paths) is never shown, only that it happened."""
    try:
        return JobError.model_validate_json(raw)
    except ValueError:
        return JobError(code="internal_error", message=GENERIC_MESSAGE)


def _error_line(error: JobError) -> str:
    where = f"shard {error.shard}: " if error.shard is not None else ""
    return f"{where}{error.code}: {error.message}"


def submit_job(request: JobRequest, store: JobStore | None = None, app=None) -> str:
    """Plan the job (bad specs fail here, before anything is queued), write ``job.json`` and send
    one task per unfinished shard; returns the job id."""
    from worker.celery_app import app as default_app

    app = app or default_app
    store = store or JobStore()
    plan = make_plan(request.spec)
    ensure_job_manifest(request.out, JobManifest(spec=request.spec, plan_hash=plan.hash, shards=plan.shards,
                                                 records_planned=plan.records))
    job_id = uuid.uuid4().hex
    store.create(job_id, request, plan.shards, plan.records)
    soft, hard = shard_time_limits(request.spec.shard_size)
    spec_json = request.spec.model_dump_json()
    task_ids = []
    for index in range(plan.shards):
        result = app.send_task("reidgen.generate_shard", args=(job_id, spec_json, request.out, index),
                               soft_time_limit=soft, time_limit=hard)
        task_ids.append(result.id)
    store.set_tasks(job_id, task_ids)
    return job_id


def cancel_job(job_id: str, store: JobStore | None = None, app=None) -> None:
    from worker.celery_app import app as default_app

    app = app or default_app
    store = store or JobStore()
    task_ids = store.cancel(job_id)
    if task_ids:
        app.control.revoke(task_ids)  # pending ones are dropped; running ones see the state and stop


class CeleryJobs:
    """The service's ``/v1/jobs`` backend (`generator_service.app.JobsBackend`)."""

    def __init__(self, store: JobStore | None = None, app=None):
        self.store, self.app = store or JobStore(), app

    def submit(self, request: JobRequest) -> str:
        return submit_job(request, self.store, self.app)

    def status(self, job_id: str) -> JobStatus:
        return self.store.status(job_id)

    def cancel(self, job_id: str) -> JobStatus:
        cancel_job(job_id, self.store, self.app)
        return self.store.status(job_id)
