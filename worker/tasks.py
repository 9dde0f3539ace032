"""The Celery task: one shard of a job, through the same `generate_shard` as `reidgen generate`.

The model is loaded lazily in each pool process on its first task (after the fork: CUDA and
forked parents do not mix) and kept for the next ones (`worker.run.load_runtime` caches it).
"""
from __future__ import annotations

import logging
import os
import traceback

import torch
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init

from api_schemas.jobs import JobSpec
from reidgen.errors import ReidgenError
from worker.celery_app import app
from worker.jobs import JobStore
from worker.run import Cancelled, generate_shard, load_runtime

log = logging.getLogger("reidgen.worker")
_store: JobStore | None = None


@worker_process_init.connect
def _init_process(**_):
    """Per pool process, after the fork: thread count, and a fresh Redis connection."""
    global _store
    threads = int(os.environ.get("REIDGEN_TORCH_THREADS", "0"))
    if threads:
        torch.set_num_threads(threads)
    _store = None


def store() -> JobStore:
    global _store
    if _store is None:
        _store = JobStore()
    return _store


@app.task(name="reidgen.generate_shard", bind=True, acks_late=True, reject_on_worker_lost=True)
def generate_shard_task(self, job_id: str, spec_json: str, out: str, index: int) -> dict:
    jobs = store()
    if jobs.cancelled(job_id):
        return {"shard": index, "status": "cancelled"}
    jobs.shard_started(job_id)
    spec = JobSpec.model_validate_json(spec_json)
    device = os.environ.get("REIDGEN_DEVICE", "auto")
    try:
        runtime = load_runtime(spec, device)
        result = generate_shard(spec, index, out, runtime, should_stop=lambda: jobs.cancelled(job_id))
    except Cancelled:
        return {"shard": index, "status": "cancelled"}
    except (ReidgenError, SoftTimeLimitExceeded) as exc:
        # Bad input or an oversized shard: retrying cannot help; the job records why and stops.
        jobs.error(job_id, f"shard {index}: {type(exc).__name__}: {exc}")
        return {"shard": index, "status": "failed"}
    except Exception as exc:  # a bug or a device failure: recorded with its traceback, then raised
        jobs.error(job_id, f"shard {index}: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}")
        raise
    jobs.shard_finished(job_id, index, result.records, result.failed)
    log.info("shard %d of job %s: %s, %d records, %d failed, %.1f s", index, job_id, result.status,
             result.records, result.failed, result.seconds)
    return {"shard": index, "status": result.status, "records": result.records, "failed": result.failed}
