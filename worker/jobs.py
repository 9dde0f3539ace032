"""Job records in Redis (progress of ``POST /v1/jobs``), submitting a job as Celery tasks, and
redoing the shards of lost workers.

Keys (under ``$REIDGEN_REDIS_PREFIX``)::

    job:ID          hash: spec, out, state, shards_total, records_planned, created, started, updated,
                    records_done, records_failed, dispatched (shards queued so far), redone
    job:ID:tasks    list of the ids of the tasks queued (for revoking on cancel)
    job:ID:done     set of finished shard indices (a redelivered shard is counted once)
    job:ID:errors   list of errors, each a `JobError` as JSON (what HTTP clients read: no internals)
    job:ID:events   list of `JobEvent` as JSON (shards redone after their worker was lost)
    job:ID:running  hash: shard index → the worker making it
    job:ID:lease:N  the running shard N's lease: expires unless its worker renews it (heartbeat)
    jobs:active     set of the ids of jobs queued or running (bounded: `TooManyJobs`)

A shard's figures are added only when its index first enters the ``done`` set, so duplicates
(redelivered tasks) never double-count.

Dispatch is lazy: a submission queues at most ``dispatch_window`` tasks, and each shard that
finishes queues the next one (`JobStore.claim_next`). A job of any size so costs the request a
bounded time, the queue holds a bounded number of its messages, and jobs submitted later are
not stuck behind all of an earlier job's shards.

Recovery: a running shard holds a lease that its task renews every ``heartbeat_s``; the lease
expires ``lease_s`` after the last renewal. Each worker's main process runs a `Watchdog` that,
every ``heartbeat_s``, looks for running shards of active jobs whose lease has expired (their
worker was SIGKILLed, lost its machine or its network), claims each once (atomically, across all
watchdogs), records a ``worker_lost`` event and queues the shard again, on the redo queue, which
the next free worker takes from first (`worker.celery_app.redo_queue_name`). The lost worker's
message still waits for the broker's visibility timeout; when it comes back, the shard is done
and the duplicate is skipped.
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid

import redis

from api_schemas.jobs import JobError, JobEvent, JobManifest, JobRequest, JobStatus
from reidgen.errors import GENERIC_MESSAGE, ReidgenError, public_error
from worker.celery_app import key_prefix, redis_url, redo_queue_name, shard_time_limits
from worker.plans import locate, make_plan
from worker.shards import ensure_job_manifest

log = logging.getLogger("reidgen.worker")
JOB_TTL_S = 30 * 24 * 3600
MAX_ERRORS = 100
MAX_EVENTS = 100
TASK = "reidgen.generate_shard"
LIVE = ("queued", "running")


class UnknownJob(ReidgenError, LookupError):
    code = "unknown_job"


class TooManyJobs(ReidgenError):
    """The server runs as many jobs as it takes: HTTP 429 with Retry-After."""

    code = "too_many_jobs"
    http_status = 429
    retry_after = 60


# Lua: the state changes are atomic across API processes and workers.
_CREATE = """
if redis.call('scard', KEYS[2]) >= tonumber(ARGV[1]) then return 0 end
redis.call('hset', KEYS[1], unpack(ARGV, 3, #ARGV - 1))
redis.call('expire', KEYS[1], ARGV[2])
redis.call('sadd', KEYS[2], ARGV[#ARGV])
return 1
"""
_CLAIM_NEXT = """
local s = redis.call('hget', KEYS[1], 'state')
if s ~= 'queued' and s ~= 'running' then return -1 end
local total = tonumber(redis.call('hget', KEYS[1], 'shards_total'))
local n = tonumber(redis.call('hget', KEYS[1], 'dispatched') or '0')
if n >= total then return -1 end
redis.call('hset', KEYS[1], 'dispatched', n + 1)
return n
"""
_END = """
local s = redis.call('hget', KEYS[1], 'state')
if s == 'queued' or s == 'running' then redis.call('hset', KEYS[1], 'state', ARGV[1]) end
redis.call('srem', KEYS[2], ARGV[2])
"""
_CLAIM_LOST = """
if redis.call('hget', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
if redis.call('exists', KEYS[2]) == 1 then return 0 end
redis.call('hdel', KEYS[1], ARGV[1])
if redis.call('sismember', KEYS[3], ARGV[1]) == 1 then return 0 end
redis.call('hincrby', KEYS[4], 'redone', 1)
return 1
"""


class JobStore:
    def __init__(self, client: redis.Redis | None = None, prefix: str | None = None):
        self.r = client or redis.Redis.from_url(redis_url())
        self.prefix = key_prefix() if prefix is None else prefix

    def _key(self, job_id: str, part: str = "") -> str:
        return f"{self.prefix}job:{job_id}{':' + part if part else ''}"

    @property
    def _active(self) -> str:
        return f"{self.prefix}jobs:active"

    def active_jobs(self) -> list[str]:
        """Ids of the jobs queued or running (ids whose record ended or expired are dropped)."""
        live = []
        for raw in self.r.smembers(self._active):
            job_id = raw.decode()
            if self.state(job_id) in LIVE:
                live.append(job_id)
            else:
                self.r.srem(self._active, job_id)
        return live

    def create(self, job_id: str, request: JobRequest, shards: int, records: int,
               max_active: int | None = None) -> bool:
        """Write the record of a new job; False (nothing written) when ``max_active`` jobs are live."""
        now = time.time()
        fields = {"spec": request.spec.model_dump_json(), "out": request.out, "state": "queued",
                  "shards_total": shards, "records_planned": records, "created": now, "updated": now,
                  "records_done": 0, "records_failed": 0, "dispatched": 0, "redone": 0}
        flat = [str(x) for kv in fields.items() for x in kv]
        limit = max_active if max_active is not None else 2**62
        return bool(self.r.eval(_CREATE, 2, self._key(job_id), self._active, limit, JOB_TTL_S, *flat, job_id))

    def claim_next(self, job_id: str) -> int | None:
        """The next shard to queue, claimed (None when all are queued or the job has ended)."""
        index = int(self.r.eval(_CLAIM_NEXT, 1, self._key(job_id)))
        return None if index < 0 else index

    def add_task(self, job_id: str, task_id: str) -> None:
        """Remember a queued task (bounded: revoking is a courtesy, tasks check the state anyway)."""
        key = self._key(job_id, "tasks")
        self.r.rpush(key, task_id)
        self.r.ltrim(key, -10_000, -1)
        self.r.expire(key, JOB_TTL_S)

    def task_ids(self, job_id: str) -> list[str]:
        return [t.decode() for t in self.r.lrange(self._key(job_id, "tasks"), 0, -1)]

    def state(self, job_id: str) -> str | None:
        value = self.r.hget(self._key(job_id), "state")
        return value.decode() if value is not None else None

    def cancelled(self, job_id: str) -> bool:
        return self.state(job_id) == "cancelled"

    def _end(self, job_id: str, state: str) -> None:
        self.r.eval(_END, 2, self._key(job_id), self._active, state, job_id)

    # -- a running shard: its lease, renewed by its task's heartbeat -------------------------------
    def shard_started(self, job_id: str, index: int = 0, worker: str = "", lease_s: float = 30.0) -> None:
        key = self._key(job_id)
        pipe = self.r.pipeline()
        pipe.set(self._key(job_id, f"lease:{index}"), worker or "?", px=int(lease_s * 1000))
        pipe.hset(self._key(job_id, "running"), index, worker or "?")
        pipe.expire(self._key(job_id, "running"), JOB_TTL_S)
        pipe.hsetnx(key, "started", time.time())
        pipe.execute()
        # queued → running, but never over a final state (a late redelivery after cancel/done).
        self.r.eval("if redis.call('hget', KEYS[1], 'state') == 'queued' then "
                    "redis.call('hset', KEYS[1], 'state', 'running') end", 1, key)

    def renew(self, job_id: str, index: int, lease_s: float) -> None:
        self.r.pexpire(self._key(job_id, f"lease:{index}"), int(lease_s * 1000))

    def shard_released(self, job_id: str, index: int) -> None:
        """The shard's task ended without finishing it (failed, cancelled): no lease to watch."""
        pipe = self.r.pipeline()
        pipe.hdel(self._key(job_id, "running"), index)
        pipe.delete(self._key(job_id, f"lease:{index}"))
        pipe.execute()

    def shard_finished(self, job_id: str, index: int, records: int, failed: int) -> None:
        key = self._key(job_id)
        if self.r.sadd(self._key(job_id, "done"), index):
            pipe = self.r.pipeline()
            pipe.hincrby(key, "records_done", records)
            pipe.hincrby(key, "records_failed", failed)
            pipe.hset(key, "updated", time.time())
            pipe.expire(self._key(job_id, "done"), JOB_TTL_S)
            pipe.execute()
        self.shard_released(job_id, index)
        total = int(self.r.hget(key, "shards_total") or 0)
        if self.r.scard(self._key(job_id, "done")) >= total:
            self._end(job_id, "done")

    def lost_shards(self) -> list[tuple[str, int, str]]:
        """(job, shard, worker) of running shards whose lease expired, each claimed for this caller
        alone: the caller queues them again."""
        lost = []
        for job_id in self.active_jobs():
            running = self._key(job_id, "running")
            for raw_index, raw_worker in self.r.hgetall(running).items():
                index = int(raw_index)
                keys = (running, self._key(job_id, f"lease:{index}"), self._key(job_id, "done"), self._key(job_id))
                if self.r.eval(_CLAIM_LOST, 4, *keys, index, raw_worker):
                    lost.append((job_id, index, raw_worker.decode()))
        return lost

    def event(self, job_id: str, event: JobEvent) -> None:
        key = self._key(job_id, "events")
        self.r.rpush(key, event.model_dump_json())
        self.r.ltrim(key, -MAX_EVENTS, -1)
        self.r.expire(key, JOB_TTL_S)

    def error(self, job_id: str, error: JobError, fatal: bool = True) -> None:
        """Record ``error`` (written for the job's HTTP clients; the details belong in the worker log)."""
        bounded = error.model_copy(update={"message": error.message[:2000]})  # still JSON when cut
        self.r.rpush(self._key(job_id, "errors"), bounded.model_dump_json())
        self.r.ltrim(self._key(job_id, "errors"), 0, MAX_ERRORS - 1)
        self.r.expire(self._key(job_id, "errors"), JOB_TTL_S)
        if fatal:
            self._end(job_id, "failed")

    def spec_and_out(self, job_id: str) -> tuple[str, str]:
        spec, out = self.r.hmget(self._key(job_id), "spec", "out")
        if spec is None:
            raise UnknownJob(f"no job {job_id!r}")
        return spec.decode(), out.decode()

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
        events = []
        for raw in self.r.lrange(self._key(job_id, "events"), 0, -1):
            try:
                events.append(JobEvent.model_validate_json(raw))
            except ValueError:
                continue
        return JobStatus(id=job_id, state=h["state"], out=h["out"], shards_total=int(h["shards_total"]),
                         shards_done=done, records_planned=int(h["records_planned"]), records_done=records,
                         records_failed=int(h["records_failed"]), images_per_s=rate,
                         errors=[_error_line(e) for e in errors], error_details=errors,
                         shards_redone=int(h.get("redone", 0)), events=events)

    def cancel(self, job_id: str) -> list[str]:
        """Mark the job cancelled (running shards stop at their next batch, queued ones are
        skipped, no more are queued); return its task ids for revoking."""
        if not self.r.exists(self._key(job_id)):
            raise UnknownJob(f"no job {job_id!r}")
        self._end(job_id, "cancelled")
        return self.task_ids(job_id)


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


def send_shard(app, job_id: str, spec_json: str, out: str, index: int, shard_size: int, store: JobStore,
               queue: str | None = None) -> str:
    soft, hard = shard_time_limits(shard_size)
    result = app.send_task(TASK, args=(job_id, spec_json, out, index), soft_time_limit=soft, time_limit=hard,
                           queue=queue)
    store.add_task(job_id, result.id)
    return result.id


def dispatch(job_id: str, count: int, store: JobStore, app=None) -> int:
    """Queue up to ``count`` more shards of the job (each claimed once); returns how many."""
    from worker.celery_app import app as default_app

    app = app or default_app
    spec_json = out = shard_size = None
    sent = 0
    for _ in range(count):
        index = store.claim_next(job_id)
        if index is None:
            break
        if spec_json is None:
            spec_json, out = store.spec_and_out(job_id)
            shard_size = json.loads(spec_json)["shard_size"]
        send_shard(app, job_id, spec_json, out, index, shard_size, store)
        sent += 1
    return sent


def check_limits(request: JobRequest, records: int, shards: int, settings) -> None:
    """A server's bounds on one job (`generator_service.app.Settings`): 400 naming the field."""
    spec = request.spec
    if records > settings.max_job_records:
        raise public_error(f"spec: the job plans {records} records; this server takes at most "
                           f"{settings.max_job_records} per job (use a smaller subset, structures_per_image or "
                           f"targets_per_source, or split the job)", code="job_too_large")
    if shards > 1 and spec.shard_size < settings.min_shard_size:
        raise public_error(f"spec.shard_size: {spec.shard_size} is below this server's minimum of "
                           f"{settings.min_shard_size} records per shard (for a job of more than one shard)",
                           code="shard_too_small")
    if shards > settings.max_job_tasks:
        least = math.ceil(records / settings.max_job_tasks)
        raise public_error(f"spec.shard_size: {spec.shard_size} makes {shards} shards (one task each); this "
                           f"server takes at most {settings.max_job_tasks} per job: give a shard_size of at least "
                           f"{least}", code="too_many_tasks")


def submit_job(request: JobRequest, store: JobStore | None = None, app=None, settings=None) -> str:
    """Plan the job (bad specs fail here, before anything is queued), write ``job.json``, record
    the job and queue its first shards (at most the dispatch window; each finished shard queues
    the next); returns the job id.

    ``settings`` (`generator_service.app.Settings`): a server's roots, which the job's names must
    stay under, and its bounds on jobs. None: `reidgen generate --submit`, run in the user's own
    shell: paths as given, no bounds (the workers still confine the paths to their roots)."""
    from worker.celery_app import app as default_app

    app = app or default_app
    store = store or JobStore()
    located = locate(request.spec, request.out, settings)
    plan = make_plan(request.spec, located.data, located.target)
    if settings is not None:
        check_limits(request, plan.records, plan.shards, settings)
        if len(store.active_jobs()) >= settings.max_active_jobs:
            raise _too_many(settings)
    ensure_job_manifest(located.out, JobManifest(spec=request.spec, plan_hash=plan.hash, shards=plan.shards,
                                                 records_planned=plan.records))
    job_id = uuid.uuid4().hex
    if not store.create(job_id, request, plan.shards, plan.records,
                        settings.max_active_jobs if settings is not None else None):
        raise _too_many(settings)
    window = settings.dispatch_window if settings is not None else 64
    dispatch(job_id, window, store, app)
    return job_id


def _too_many(settings) -> TooManyJobs:
    message = (f"this server already runs {settings.max_active_jobs} jobs (queued or running), as many as it "
               f"takes; retry when one has finished")
    return TooManyJobs(message, public=message)


def cancel_job(job_id: str, store: JobStore | None = None, app=None) -> None:
    from worker.celery_app import app as default_app

    app = app or default_app
    store = store or JobStore()
    task_ids = store.cancel(job_id)
    if task_ids:
        app.control.revoke(task_ids)  # queued ones are dropped; running ones see the state and stop


def redo_lost_shards(store: JobStore, app, lease_s: float) -> list[tuple[str, int]]:
    """Queue again every running shard whose worker stopped renewing its lease; each is recorded
    on its job as a ``worker_lost`` event. Returns (job, shard) of those queued."""
    redone = []
    for job_id, index, worker in store.lost_shards():
        log.warning("shard %d of job %s: no heartbeat from %s for %.0f s; queueing it again", index, job_id,
                    worker, lease_s)
        store.event(job_id, JobEvent(shard=index, code="worker_lost", at=time.time(), message=(
            f"the worker making this shard stopped sending heartbeats for {lease_s:g} s (killed or lost); the "
            f"shard was queued again and its partial output discarded")))
        spec_json, out = store.spec_and_out(job_id)
        send_shard(app, job_id, spec_json, out, index, json.loads(spec_json)["shard_size"], store,
                   queue=redo_queue_name())
        redone.append((job_id, index))
    return redone


class Watchdog(threading.Thread):
    """In each worker's main process: every ``heartbeat_s``, `redo_lost_shards`."""

    def __init__(self, app, heartbeat_s: float, lease_s: float, store: JobStore | None = None):
        super().__init__(name="reidgen-watchdog", daemon=True)
        self.app, self.heartbeat_s, self.lease_s = app, heartbeat_s, lease_s
        self.store = store
        self.stopped = threading.Event()

    def run(self) -> None:
        store = self.store or JobStore()
        while not self.stopped.wait(self.heartbeat_s):
            try:
                redo_lost_shards(store, self.app, self.lease_s)
            except Exception:  # noqa: BLE001 - Redis away for a moment: try again next round
                log.exception("watchdog round failed")

    def stop(self) -> None:
        self.stopped.set()


class Heartbeat:
    """While a shard runs: renew its lease every ``heartbeat_s`` (a thread of the task's process)."""

    def __init__(self, store: JobStore, job_id: str, index: int, heartbeat_s: float, lease_s: float):
        self.store, self.job_id, self.index = store, job_id, index
        self.heartbeat_s, self.lease_s = heartbeat_s, lease_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="reidgen-heartbeat", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.store.renew(self.job_id, self.index, self.lease_s)
            except Exception:  # noqa: BLE001 - a missed beat; the lease allows several
                log.warning("heartbeat of shard %d of job %s failed", self.index, self.job_id, exc_info=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


class CeleryJobs:
    """The service's ``/v1/jobs`` backend (`generator_service.app.JobsBackend`)."""

    def __init__(self, store: JobStore | None = None, app=None):
        self.store, self.app = store or JobStore(), app

    def submit(self, request: JobRequest, settings=None) -> str:
        return submit_job(request, self.store, self.app, settings)

    def full(self, settings) -> bool:
        """As many jobs queued or running as ``settings`` allows (checked before a body is read)."""
        return len(self.store.active_jobs()) >= settings.max_active_jobs

    def status(self, job_id: str) -> JobStatus:
        return self.store.status(job_id)

    def cancel(self, job_id: str) -> JobStatus:
        cancel_job(job_id, self.store, self.app)
        return self.store.status(job_id)
