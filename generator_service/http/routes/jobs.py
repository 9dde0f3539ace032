"""`/v1/jobs`: batch jobs through a `JobsBackend` (only on a server given one)."""
from __future__ import annotations

from typing import Protocol

from fastapi import FastAPI, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from api_schemas.jobs import JobRequest, JobStatus
from generator_service.http.errors import ApiError
from generator_service.http.openapi import JOB_ERRORS, JOB_SUBMIT_ERRORS, error_docs, request_body
from generator_service.http.parsing import Service, media_type, require_json
from generator_service.http.settings import Settings


class JobsBackend(Protocol):
    """Where ``/v1/jobs`` sends batch jobs: `worker.jobs.CeleryJobs` (Celery over Redis). Passed in
    by whoever builds the app, so this package does not import the workers."""

    def submit(self, request: JobRequest, settings: Settings) -> str: ...  # names confined to its roots

    def status(self, job_id: str) -> JobStatus: ...  # LookupError for an unknown id

    def cancel(self, job_id: str) -> JobStatus: ...


JOB_ID_PATTERN = r"^[0-9a-f]{32}$"


def add_job_routes(app: FastAPI, jobs: JobsBackend, service: Service) -> None:
    """``/v1/jobs``: only on a server given a jobs backend (without one the paths do not exist)."""
    async def job_call(fn, *args) -> JobStatus:
        try:
            return await run_in_threadpool(fn, *args)
        except LookupError as exc:
            raise ApiError(404, "unknown_job", str(exc).strip("'\"")) from None

    job_id_param = PathParam(pattern=JOB_ID_PATTERN, description="the id POST /v1/jobs returned")

    @app.post("/v1/jobs", response_model=JobStatus, status_code=202, tags=["jobs"],
              responses=error_docs(*JOB_SUBMIT_ERRORS), openapi_extra=request_body(JobRequest))
    async def submit_job(request: Request) -> JSONResponse:
        """Submit a batch generation job (one Celery task per shard); its progress is at GET /v1/jobs/{id}.
        ``checkpoint`` and ``teacher`` name models under the server's models root (checked here to
        be checkpoints of the kinds the job needs), ``data`` and ``target`` data sets under its data
        root, ``out`` a folder under its shards root, not inside another job's folder."""
        require_json(media_type(request), "/v1/jobs")
        full = getattr(jobs, "full", None)
        if full is not None and await run_in_threadpool(full, service.settings):  # 429 before the body is read
            busy = ApiError(429, "too_many_jobs", f"this server already runs {service.settings.max_active_jobs} jobs "
                                                  f"(queued or running), as many as it takes; retry when one has "
                                                  f"finished")
            busy.retry_after = 60
            raise busy
        req = await service.parse(JobRequest, request, generates=False)
        # Confines the names, plans the job, checks its bounds: a bad spec fails here (400, 429).
        job_id = await run_in_threadpool(jobs.submit, req, service.settings)
        status = await job_call(jobs.status, job_id)
        return JSONResponse(status.model_dump(), status_code=202, headers={"Location": f"/v1/jobs/{job_id}"})

    @app.get("/v1/jobs/{job_id}", response_model=JobStatus, tags=["jobs"], responses=error_docs(*JOB_ERRORS))
    async def job_status(job_id: str = job_id_param) -> JobStatus:
        """Progress of a job: shards done/total, records, images/s, errors."""
        return await job_call(jobs.status, job_id)

    @app.delete("/v1/jobs/{job_id}", response_model=JobStatus, tags=["jobs"],
                responses=error_docs(*JOB_ERRORS))
    async def cancel_job(job_id: str = job_id_param) -> JobStatus:
        """Cancel a job: pending shards are dropped, running ones stop at their next batch (finished
        shards stay)."""
        return await job_call(jobs.cancel, job_id)
