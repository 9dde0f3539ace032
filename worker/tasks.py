"""The Celery task: one shard of a job, through the same `generate_shard` as `reidgen generate`.

The model is loaded lazily in each pool process on its first task (after the fork: CUDA and
forked parents do not mix) and kept for the next ones (`worker.run.load_runtime` caches it).
"""
from __future__ import annotations

import logging
import os

import torch
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init, worker_ready, worker_shutdown

from api_schemas.jobs import JobError, JobSpec
from reidgen.core.errors import GENERIC_MESSAGE, ReidgenError, public_message
from worker.celery_app import app, worker_settings
from worker.jobs import LIVE, Heartbeat, JobStore, JobStoreUnavailable, Watchdog, check_sizes, dispatch
from worker.plans import locate
from worker.run import Cancelled, generate_shard, load_runtime

log = logging.getLogger("reidgen.worker")
_store: JobStore | None = None
_watchdog: Watchdog | None = None


@worker_process_init.connect
def _init_process(**_):
    """Per pool process, after the fork: thread count, and a fresh Redis connection."""
    global _store
    threads = worker_settings().torch_threads
    if threads:
        torch.set_num_threads(threads)
    _store = None


def store() -> JobStore:
    global _store
    if _store is None:
        _store = JobStore()
    return _store


def client_error(exc: BaseException, index: int) -> JobError:
    """What the job's HTTP clients read about ``exc``: a code and a line naming the spec's field,
    never the exception's own text (it names the worker's paths and quotes the files it read)."""
    if isinstance(exc, SoftTimeLimitExceeded):
        return JobError(shard=index, code="shard_timeout",
                        message="the shard ran past its time limit; give the spec a smaller shard_size")
    if isinstance(exc, ReidgenError):
        return JobError(shard=index, code=exc.code, message=public_message(exc))
    return JobError(shard=index, code="internal_error", message=GENERIC_MESSAGE)


def settings():
    """This worker's `Settings` (roots, heartbeat and lease) from its `WorkerSettings`: those
    `reidgen worker` installed from its flags and the environment (`worker.celery_app.use_settings`)."""
    from generator_service.http import Settings

    return Settings.from_env(worker=worker_settings())


def _record_failure(jobs: JobStore, job_id: str, index: int, exc: BaseException) -> None:
    """Release the shard and fail the job with ``exc``'s client line; when Redis is still away,
    only the log says so (the shard's lease then runs out, and a watchdog queues it again)."""
    try:
        jobs.shard_released(job_id, index)
        jobs.error(job_id, client_error(exc, index))
    except JobStoreUnavailable:
        log.error("shard %d of job %s: its failure could not be recorded (Redis unreachable)", index, job_id)


@worker_ready.connect
def _start_watchdog(sender=None, **_):
    """In the worker's main process: redo the shards of lost workers (`worker.jobs.Watchdog`)."""
    global _watchdog
    s = settings()
    _watchdog = Watchdog(app, s.heartbeat_s, s.lease_s)
    _watchdog.start()


@worker_shutdown.connect
def _stop_watchdog(**_):
    if _watchdog is not None:
        _watchdog.stop()


@app.task(name="reidgen.generate_shard", bind=True, acks_late=True, reject_on_worker_lost=True)
def generate_shard_task(self, job_id: str, spec_json: str, out: str, index: int) -> dict:
    jobs = store()
    if jobs.state(job_id) not in LIVE:  # cancelled, failed or gone: nothing to do, nothing to queue
        return {"shard": index, "status": jobs.state(job_id) or "unknown"}
    if not isinstance(index, int) or not jobs.matches(job_id, spec_json, out, index):
        # Not a task this job's API sent (pushed into Redis by hand): refused, the job left as it is.
        log.warning("refused a task for job %s (shard %r): its arguments are not the job's", job_id, index)
        return {"shard": index, "status": "refused"}
    config = settings()
    worker = f"{getattr(self.request, 'hostname', None) or 'local'}:{os.getpid()}"
    jobs.shard_started(job_id, index, worker, config.lease_s)
    spec = JobSpec.model_validate_json(spec_json)
    device = worker_settings().device
    try:
        with Heartbeat(jobs, job_id, index, config.heartbeat_s, config.lease_s, worker):
            check_sizes(spec, config)  # a task sent past the API (Redis, --submit) meets the same bounds
            located = locate(spec, out, config)  # this worker's roots: a name outside them fails the job
            runtime = load_runtime(spec, device, located)
            result = generate_shard(spec, index, out, runtime, located=located,
                                    should_stop=lambda: jobs.cancelled(job_id))
    except Cancelled:
        jobs.shard_released(job_id, index)
        return {"shard": index, "status": "cancelled"}
    except (ReidgenError, SoftTimeLimitExceeded) as exc:
        # Bad input, an oversized shard, or Redis away past the worker's patience (a Redis outage
        # shorter than that is waited out: `worker.jobs.retrying`): the job records why and stops.
        log.warning("shard %d of job %s failed: %s: %s", index, job_id, type(exc).__name__, exc)
        _record_failure(jobs, job_id, index, exc)
        return {"shard": index, "status": "failed"}
    except Exception as exc:  # a bug or a device failure: logged with its traceback, then raised
        log.error("shard %d of job %s failed with an internal error", index, job_id, exc_info=exc)
        _record_failure(jobs, job_id, index, exc)
        raise
    jobs.shard_finished(job_id, index, result.records, result.failed)
    dispatch(job_id, 1, jobs, app)  # the job's next shard takes this one's place in the queue
    log.info("shard %d of job %s: %s, %d records, %d failed, %.1f s", index, job_id, result.status,
             result.records, result.failed, result.seconds)
    return {"shard": index, "status": result.status, "records": result.records, "failed": result.failed}
