"""Issue 23, item 6: a task pushed straight into Redis, naming a live job, must not fail that job.

The worker's task runs here in-process (`apply`), as a Celery worker would run a message it took
from the queue: once with arguments the job's API never sent, once with the job's own.
"""
from __future__ import annotations

import uuid

import pytest

from api_schemas.jobs import JobRequest, JobSpec


@pytest.fixture
def job(broker, monkeypatch):
    from worker import tasks
    from worker.jobs import JobStore

    store = JobStore(broker["client"], broker["prefix"])
    monkeypatch.setattr(tasks, "_store", store)
    spec = JobSpec(kind="dgnet_random_structures", checkpoint="dgnet", data="market1501_mini", subset=4,
                   structures_per_image=1, shard_size=2)
    job_id = uuid.uuid4().hex
    assert store.create(job_id, JobRequest(spec=spec, out="real-out"), shards=2, records=4)
    return store, job_id, spec


@pytest.mark.parametrize("forged", ["other checkpoint", "other out", "shard past the plan", "index not a number"])
def test_a_forged_task_is_refused_and_the_job_left_as_it_is(job, forged):
    from worker.tasks import generate_shard_task

    store, job_id, spec = job
    spec_json, out, index = spec.model_dump_json(), "real-out", 0
    if forged == "other checkpoint":
        spec_json = spec.model_copy(update={"checkpoint": "/etc/passwd"}).model_dump_json()
    elif forged == "other out":
        out = "../elsewhere"
    elif forged == "shard past the plan":
        index = 2
    else:
        index = "0; drop"
    result = generate_shard_task.apply(args=(job_id, spec_json, out, index)).get()
    assert result["status"] == "refused"
    status = store.status(job_id)
    assert status.state == "queued" and not status.errors, status


def test_the_jobs_own_task_is_taken(job, monkeypatch):
    """The same check lets the job's own arguments through: the task goes on to run the shard
    (here it stops at the first step after the check, which the test replaces)."""
    from worker import tasks

    store, job_id, spec = job
    started = []
    monkeypatch.setattr(store, "shard_started", lambda *a, **k: started.append(a) or (_ for _ in ()).throw(
        RuntimeError("stop here")))
    with pytest.raises(RuntimeError, match="stop here"):
        tasks.generate_shard_task.apply(args=(job_id, spec.model_dump_json(), "real-out", 1)).get()
    assert started and started[0][:2] == (job_id, 1)
