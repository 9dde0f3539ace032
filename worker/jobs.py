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

Redis outages (a restart, a failover, a Redis still loading its data): every call a running
shard makes to its job record (`retrying`) is tried again with a growing pause, for up to
``retry_s`` (``$REIDGEN_REDIS_RETRY_S``, default 60 s); only beyond that does it fail, with the
code ``job_store_unavailable`` (`JobStoreUnavailable`). The cancellation check does not wait: an
unreachable Redis reads as "not cancelled, ask again at the next batch", so the shard keeps
working through the outage. The calls are safe to repeat: a command whose reply was lost may
have run, so the counters are added in one script together with the ``done`` set's membership
(`shard_finished`), and a shard is claimed for dispatch under a token that a repeat returns
again (`claim_next`). A lease that ran out while Redis was away is set again by its heartbeat
(the shard is still recorded as this worker's), and a watchdog that saw Redis away waits one
lease period before it declares any shard lost, so the live workers renew theirs first.
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid

import redis
from kombu.exceptions import OperationalError

from api_schemas.jobs import JobError, JobEvent, JobManifest, JobRequest, JobStatus
from reidgen.core.errors import GENERIC_MESSAGE, ReidgenError, public_error
from worker.celery_app import key_prefix, redis_retry_s, redis_url, redo_queue_name, shard_time_limits
from worker.plans import locate, make_plan
from worker.shards import ensure_job_manifest
from worker.submission import check_models

log = logging.getLogger("reidgen.worker")
JOB_TTL_S = 30 * 24 * 3600
MAX_ERRORS = 100
MAX_EVENTS = 100
TASK = "reidgen.generate_shard"
LIVE = ("queued", "running")
# What a Redis restart raises (BusyLoadingError, "still loading", is a ConnectionError); the
# broker's (kombu's) error when a task cannot be sent.
TRANSIENT = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
TRANSIENT_SEND = TRANSIENT + (OperationalError,)
FIRST_PAUSE_S, MAX_PAUSE_S = 0.1, 2.0


class UnknownJob(ReidgenError, LookupError):
    code = "unknown_job"


class TooManyJobs(ReidgenError):
    """The server runs as many jobs as it takes: HTTP 429 with Retry-After."""

    code = "too_many_jobs"
    http_status = 429
    retry_after = 60


class JobStoreUnavailable(ReidgenError):
    """Redis (the job records and the queue) stayed unreachable longer than the caller waits: a
    worker's shard fails with it, an HTTP request gets 503."""

    code = "job_store_unavailable"
    http_status = 503
    retry_after = 5

    def __init__(self, retry_s: float, what: str):
        public = (f"the job store (Redis) was unreachable for more than {retry_s:g} s (when it {what}); try "
                  "again later: a job's finished shards are kept")
        super().__init__(public, public=public)


def retrying(call, what: str, retry_s: float, transient: tuple = TRANSIENT, sleep=time.sleep):
    """``call()``, tried again on ``transient`` errors with a doubling pause (at most
    `MAX_PAUSE_S`) until ``retry_s`` have passed; then `JobStoreUnavailable`. ``call`` must be
    safe to repeat: a command whose reply was lost may have run."""
    deadline = time.monotonic() + retry_s
    pause = FIRST_PAUSE_S
    failures = 0
    while True:
        try:
            result = call()
        except transient as exc:
            failures += 1
            left = deadline - time.monotonic()
            if left <= 0:
                log.error("Redis unreachable for %g s when the job store %s; giving up: %s", retry_s, what, exc)
                raise JobStoreUnavailable(retry_s, what) from exc
            if failures == 1:
                log.warning("Redis unreachable when the job store %s (%s: %s); retrying for up to %g s", what,
                            type(exc).__name__, exc, retry_s)
            sleep(min(pause, left))
            pause = min(pause * 2, MAX_PAUSE_S)
            continue
        if failures:
            log.info("Redis reachable again (a worker %s, after %d failed tries)", what, failures)
        return result


# Lua: the state changes are atomic across API processes and workers.
_CREATE = """
if redis.call('scard', KEYS[2]) >= tonumber(ARGV[1]) then return 0 end
redis.call('hset', KEYS[1], unpack(ARGV, 3, #ARGV - 1))
redis.call('expire', KEYS[1], ARGV[2])
redis.call('sadd', KEYS[2], ARGV[#ARGV])
return 1
"""
_CLAIM_NEXT = """
local before = redis.call('hget', KEYS[2], ARGV[1])
if before then return tonumber(before) end
local s = redis.call('hget', KEYS[1], 'state')
if s ~= 'queued' and s ~= 'running' then return -1 end
local total = tonumber(redis.call('hget', KEYS[1], 'shards_total'))
local n = tonumber(redis.call('hget', KEYS[1], 'dispatched') or '0')
if n >= total then return -1 end
redis.call('hset', KEYS[1], 'dispatched', n + 1)
redis.call('hset', KEYS[2], ARGV[1], n)
redis.call('expire', KEYS[2], ARGV[2])
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
# A shard's figures, counted once (the done set decides), and the job's end when it was the
# last: one script, so a repeat after a lost reply finds the index in the set and adds nothing.
_FINISH = """
if redis.call('sadd', KEYS[2], ARGV[1]) == 1 then
  redis.call('hincrby', KEYS[1], 'records_done', ARGV[2])
  redis.call('hincrby', KEYS[1], 'records_failed', ARGV[3])
  redis.call('hset', KEYS[1], 'updated', ARGV[4])
  redis.call('expire', KEYS[2], ARGV[5])
end
redis.call('hdel', KEYS[3], ARGV[1])
redis.call('del', KEYS[4])
local total = tonumber(redis.call('hget', KEYS[1], 'shards_total') or '0')
if redis.call('scard', KEYS[2]) >= total then
  local s = redis.call('hget', KEYS[1], 'state')
  if s == 'queued' or s == 'running' then redis.call('hset', KEYS[1], 'state', 'done') end
  redis.call('srem', KEYS[5], ARGV[6])
end
"""
# Renew a lease; one that ran out (Redis was away longer than the lease) is set again while the
# shard is still recorded as this worker's (no watchdog has queued it again): 1 renewed, 2 set
# again, 0 lost (another run of the shard was queued).
_RENEW = """
if redis.call('pexpire', KEYS[1], ARGV[1]) == 1 then return 1 end
if redis.call('hget', KEYS[2], ARGV[2]) == ARGV[3] then
  redis.call('set', KEYS[1], ARGV[3], 'px', ARGV[1])
  return 2
end
return 0
"""
# An error, appended once (a repeat after a lost reply finds it last in the list).
_ERROR = """
if redis.call('lindex', KEYS[1], -1) ~= ARGV[1] then
  redis.call('rpush', KEYS[1], ARGV[1])
  redis.call('ltrim', KEYS[1], 0, ARGV[2] - 1)
end
redis.call('expire', KEYS[1], ARGV[3])
"""


class JobStore:
    def __init__(self, client: redis.Redis | None = None, prefix: str | None = None,
                 retry_s: float | None = None):
        self.r = client or redis.Redis.from_url(redis_url())
        self.prefix = key_prefix() if prefix is None else prefix
        self.retry_s = redis_retry_s() if retry_s is None else retry_s
        self._unreachable_since: float | None = None  # the cancellation checks' outage

    def _retry(self, call, what: str):
        return retrying(call, what, self.retry_s)

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
        token = uuid.uuid4().hex  # a repeat of this claim (its reply lost) gets the same shard
        index = int(self._retry(lambda: self.r.eval(_CLAIM_NEXT, 2, self._key(job_id), self._key(job_id, "claims"),
                                                    token, JOB_TTL_S), "claimed the next shard"))
        return None if index < 0 else index

    def add_task(self, job_id: str, task_id: str) -> None:
        """Remember a queued task (bounded: revoking is a courtesy, tasks check the state anyway)."""
        key = self._key(job_id, "tasks")

        def add():
            pipe = self.r.pipeline()
            pipe.rpush(key, task_id)  # a repeat lists the id twice: revoking it twice is harmless
            pipe.ltrim(key, -10_000, -1)
            pipe.expire(key, JOB_TTL_S)
            pipe.execute()
        self._retry(add, "recorded a queued task")

    def task_ids(self, job_id: str) -> list[str]:
        return [t.decode() for t in self.r.lrange(self._key(job_id, "tasks"), 0, -1)]

    def _state(self, job_id: str) -> str | None:
        value = self.r.hget(self._key(job_id), "state")
        return value.decode() if value is not None else None

    def state(self, job_id: str) -> str | None:
        return self._retry(lambda: self._state(job_id), "read a job's state")

    def cancelled(self, job_id: str) -> bool:
        """Whether the job was cancelled; polled between a shard's batches. Redis unreachable reads
        as "not cancelled" (the shard goes on, the next batch asks again) until it has been so for
        ``retry_s``: then `JobStoreUnavailable`."""
        try:
            state = self._state(job_id)
        except TRANSIENT as exc:
            now = time.monotonic()
            if self._unreachable_since is None:
                self._unreachable_since = now
                log.warning("Redis unreachable at the cancellation check of job %s (%s); going on", job_id, exc)
            if now - self._unreachable_since > self.retry_s:
                raise JobStoreUnavailable(self.retry_s, "checked whether its job was cancelled") from exc
            return False
        self._unreachable_since = None
        return state == "cancelled"

    def _end(self, job_id: str, state: str) -> None:
        self.r.eval(_END, 2, self._key(job_id), self._active, state, job_id)

    # -- a running shard: its lease, renewed by its task's heartbeat -------------------------------
    def shard_started(self, job_id: str, index: int = 0, worker: str = "", lease_s: float = 30.0) -> None:
        key = self._key(job_id)

        def start():  # every step is safe to repeat
            pipe = self.r.pipeline()
            pipe.set(self._key(job_id, f"lease:{index}"), worker or "?", px=int(lease_s * 1000))
            pipe.hset(self._key(job_id, "running"), index, worker or "?")
            pipe.expire(self._key(job_id, "running"), JOB_TTL_S)
            pipe.hsetnx(key, "started", time.time())
            pipe.execute()
            # queued → running, but never over a final state (a late redelivery after cancel/done).
            self.r.eval("if redis.call('hget', KEYS[1], 'state') == 'queued' then "
                        "redis.call('hset', KEYS[1], 'state', 'running') end", 1, key)
        self._retry(start, "started a shard")

    def renew(self, job_id: str, index: int, lease_s: float, worker: str = "") -> int:
        """Renew the shard's lease (1), or set it again when it ran out while the shard is still
        this worker's (2: Redis was away longer than the lease); 0: the shard was queued again."""
        keys = (self._key(job_id, f"lease:{index}"), self._key(job_id, "running"))
        return int(self._retry(lambda: self.r.eval(_RENEW, 2, *keys, int(lease_s * 1000), index, worker or "?"),
                               "renewed a shard's lease"))

    def shard_released(self, job_id: str, index: int) -> None:
        """The shard's task ended without finishing it (failed, cancelled): no lease to watch."""
        def release():
            pipe = self.r.pipeline()
            pipe.hdel(self._key(job_id, "running"), index)
            pipe.delete(self._key(job_id, f"lease:{index}"))
            pipe.execute()
        self._retry(release, "released a shard")

    def shard_finished(self, job_id: str, index: int, records: int, failed: int) -> None:
        keys = (self._key(job_id), self._key(job_id, "done"), self._key(job_id, "running"),
                self._key(job_id, f"lease:{index}"), self._active)
        now = time.time()
        self._retry(lambda: self.r.eval(_FINISH, len(keys), *keys, index, records, failed, now, JOB_TTL_S, job_id),
                    "recorded a finished shard")

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

        def add():
            pipe = self.r.pipeline()
            pipe.rpush(key, event.model_dump_json())
            pipe.ltrim(key, -MAX_EVENTS, -1)
            pipe.expire(key, JOB_TTL_S)
            pipe.execute()
        self._retry(add, "recorded a job event")

    def error(self, job_id: str, error: JobError, fatal: bool = True) -> None:
        """Record ``error`` (written for the job's HTTP clients; the details belong in the worker log)."""
        bounded = error.model_copy(update={"message": error.message[:2000]})  # still JSON when cut
        self._retry(lambda: self.r.eval(_ERROR, 1, self._key(job_id, "errors"), bounded.model_dump_json(), MAX_ERRORS,
                                        JOB_TTL_S), "recorded a job error")
        if fatal:
            self._retry(lambda: self._end(job_id, "failed"), "ended a job")

    def spec_and_out(self, job_id: str) -> tuple[str, str]:
        spec, out = self._retry(lambda: self.r.hmget(self._key(job_id), "spec", "out"), "read a job's spec")
        if spec is None:
            raise UnknownJob(f"no job {job_id!r}")
        return spec.decode(), out.decode()

    def matches(self, job_id: str, spec_json: str, out: str, index: int) -> bool:
        """Whether a task's arguments are the job's own: the spec and ``out`` the API recorded (every
        task `dispatch` sends carries them verbatim) and a shard index of its plan. A task pushed
        into the broker by anyone else names a job but not its spec: it must not fail that job."""
        try:
            recorded = self.spec_and_out(job_id)
        except UnknownJob:
            return False
        total = self._retry(lambda: self.r.hget(self._key(job_id), "shards_total"), "read a job's size")
        return recorded == (spec_json, out) and total is not None and 0 <= index < int(total)

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
    # The broker is the same Redis: a repeat may queue the shard twice, and the duplicate is skipped.
    result = retrying(lambda: app.send_task(TASK, args=(job_id, spec_json, out, index), soft_time_limit=soft,
                                            time_limit=hard, queue=queue),
                      "queued a shard", store.retry_s, TRANSIENT_SEND)
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


def check_sizes(spec, settings) -> None:
    """A server's bounds on what one shard of a job costs a worker: its records and its device
    batch (400 naming the field). The submitting server and each worker check them."""
    if spec.shard_size > settings.max_shard_size:
        raise public_error(f"spec.shard_size: {spec.shard_size} is above this server's maximum of "
                           f"{settings.max_shard_size} records per shard; give a smaller shard_size (a job may "
                           f"have more shards)", code="shard_too_large")
    if spec.batch_size > settings.max_batch_size:
        raise public_error(f"spec.batch_size: {spec.batch_size} is above this server's maximum of "
                           f"{settings.max_batch_size} images per device batch; give a smaller batch_size",
                           code="batch_too_large")


def check_limits(request: JobRequest, records: int, shards: int, settings) -> None:
    """A server's bounds on one job (`generator_service.http.Settings`): 400 naming the field."""
    spec = request.spec
    check_sizes(spec, settings)
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

    ``settings`` (`generator_service.http.Settings`): a server's roots, which the job's names must
    stay under (its models checkpoints of the kinds the job needs), and its bounds on jobs. None:
    `reidgen generate --submit`, run in the user's own shell: paths as given, no bounds (the
    workers still confine the paths to their roots)."""
    from worker.celery_app import app as default_app

    app = app or default_app
    store = store or JobStore()
    located = locate(request.spec, request.out, settings)
    if settings is not None and settings.confined:  # names the workers would refuse: refused now
        check_models(request.spec, located, settings.models_root)
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
        self._redis_away = False
        self._quiet_until = 0.0

    def round(self, store: JobStore) -> list[tuple[str, int]]:
        """One round. After Redis was away, none for one lease period: a lease may have run out
        during the outage, and its live worker renews it (`Heartbeat`) before it counts as lost."""
        try:
            store.r.ping()
        except TRANSIENT as exc:
            if not self._redis_away:
                log.warning("watchdog: Redis unreachable (%s); no shard is declared lost until it is back", exc)
            self._redis_away = True
            return []
        now = time.monotonic()
        if self._redis_away:
            self._redis_away = False
            self._quiet_until = now + self.lease_s
            log.info("watchdog: Redis is back; waiting %g s for the running shards to renew their leases", self.lease_s)
        if now < self._quiet_until:
            return []
        return redo_lost_shards(store, self.app, self.lease_s)

    def run(self) -> None:
        store = self.store or JobStore()
        while not self.stopped.wait(self.heartbeat_s):
            try:
                self.round(store)
            except TRANSIENT + (JobStoreUnavailable,):
                self._redis_away = True  # gone mid-round: the next rounds wait for it as above
                log.warning("watchdog round failed: Redis unreachable", exc_info=True)
            except Exception:  # noqa: BLE001 - try again next round
                log.exception("watchdog round failed")

    def stop(self) -> None:
        self.stopped.set()


class Heartbeat:
    """While a shard runs: renew its lease every ``heartbeat_s`` (a thread of the task's process)."""

    def __init__(self, store: JobStore, job_id: str, index: int, heartbeat_s: float, lease_s: float,
                 worker: str = ""):
        self.store, self.job_id, self.index, self.worker = store, job_id, index, worker
        self.heartbeat_s, self.lease_s = heartbeat_s, lease_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="reidgen-heartbeat", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:  # through a Redis outage: retried (`JobStore.renew`), the lease set again if it ran out
                renewed = self.store.renew(self.job_id, self.index, self.lease_s, self.worker)
            except Exception:  # noqa: BLE001 - a missed beat; the next one tries again
                log.warning("heartbeat of shard %d of job %s failed", self.index, self.job_id, exc_info=True)
                continue
            if self._stop.is_set():  # the shard ended while this beat waited for Redis
                return
            if renewed == 2:
                log.warning("shard %d of job %s: its lease ran out while Redis was away; set again", self.index,
                            self.job_id)
            elif renewed == 0:
                log.warning("shard %d of job %s: its lease ran out and the shard was queued again; this run goes "
                            "on (the first to finish keeps the shard)", self.index, self.job_id)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


# An HTTP request waits this long for an unreachable Redis before its 503 (workers wait much longer).
API_STORE_RETRY_S = 2.0


class CeleryJobs:
    """The service's ``/v1/jobs`` backend (`generator_service.http.JobsBackend`)."""

    def __init__(self, store: JobStore | None = None, app=None):
        self.store, self.app = store or JobStore(retry_s=API_STORE_RETRY_S), app

    @staticmethod
    def _answer(call, what: str, repeatable: bool = True):
        """A request's use of Redis: an outage becomes `JobStoreUnavailable` (HTTP 503) within
        `API_STORE_RETRY_S`, not a 500. Only calls that can be repeated whole are retried."""
        if repeatable:
            return retrying(call, what, API_STORE_RETRY_S)
        try:
            return call()
        except TRANSIENT as exc:
            raise JobStoreUnavailable(API_STORE_RETRY_S, what) from exc

    def submit(self, request: JobRequest, settings=None) -> str:
        # Its writes retry inside the store (with this store's short bound); the whole is not repeated.
        return self._answer(lambda: submit_job(request, self.store, self.app, settings), "took a job",
                            repeatable=False)

    def full(self, settings) -> bool:
        """As many jobs queued or running as ``settings`` allows (checked before a body is read)."""
        return self._answer(lambda: len(self.store.active_jobs()) >= settings.max_active_jobs,
                            "counted the active jobs")

    def status(self, job_id: str) -> JobStatus:
        return self._answer(lambda: self.store.status(job_id), "read a job")

    def cancel(self, job_id: str) -> JobStatus:
        self._answer(lambda: cancel_job(job_id, self.store, self.app), "cancelled a job", repeatable=False)
        return self.status(job_id)
