"""Batch jobs through real Celery worker processes and a real Redis (``$REDIS_URL``, default
redis://127.0.0.1:6379/0; these tests use database 13 of that server and a key prefix and queue
of their own, so they collide with nothing). Real checkpoints, real images (market1501_mini).

- a job of several shards completes with exactly the planned records, identical to the shards
  of the in-process path (`reidgen generate`);
- a worker killed with SIGKILL mid-shard, and a restarted one, still finish the job: no record
  lost or duplicated, every checksum valid, the records identical to the in-process ones;
- a cancelled job runs no shard.

The job names its checkpoint, data and output folder under the roots of the server and the
workers (the tiny DG-Net run's folder for models and data, pytest's base temporary folder for
shards). Dispatch is lazy here (a window of 2 tasks), so the workers queue most shards
themselves. The fast recovery from a SIGKILLed worker (lease expired, shard queued again) is
tested in tests/test_recovery.py.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
import torch

from api_schemas.jobs import JobRequest, JobSpec
from worker.plans import make_plan
from worker.shards import ShardReader, shard_paths, verify

REPO = Path(__file__).resolve().parents[1]
TEST_DB = 13


def _test_redis_url() -> str:
    base = urlsplit(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    return urlunsplit(base._replace(path=f"/{TEST_DB}"))


@pytest.fixture(scope="module")
def broker(tmp_path_factory, tiny_dgnet):
    """Environment of an isolated broker (a Redis database, a key prefix and a queue per run) and
    of the workers' roots."""
    url = _test_redis_url()
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis at {url} ({exc})")
    tag = uuid.uuid4().hex[:8]
    env = {"REDIS_URL": url, "REIDGEN_REDIS_PREFIX": f"reidgen-test-{tag}:", "REIDGEN_QUEUE": f"shards-{tag}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from generator_service.http import Settings
    from worker.celery_app import make_app
    from worker.jobs import JobStore

    app = make_app()
    store = JobStore(redis.Redis.from_url(url), env["REIDGEN_REDIS_PREFIX"])
    roots = Settings(models_root=tiny_dgnet["root"], data_root=tiny_dgnet["root"],
                     shards_root=tmp_path_factory.getbasetemp(), min_shard_size=1, dispatch_window=2)
    yield {"env": env, "app": app, "store": store, "roots": roots, "logs": tmp_path_factory.mktemp("worker-logs")}
    client = redis.Redis.from_url(url)
    for key in client.scan_iter(f"{env['REIDGEN_REDIS_PREFIX']}*"):
        client.delete(key)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


class Worker:
    """A `reidgen worker` process group (main process + one pool process)."""

    def __init__(self, broker, name: str):
        env = {**os.environ, **broker["env"], "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.log = broker["logs"] / f"{name}.log"
        roots = broker["roots"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "reidgen", "worker", "--concurrency", "1", "--threads", "1", "--device", "cpu",
             "--loglevel", "info", "--hostname", f"{name}@%h",
             "--models-root", str(roots.models_root), "--data-root", str(roots.data_root),
             "--shards-root", str(roots.shards_root),
             # A killed worker's shard is queued again once its lease runs out (default: 30 s).
             "--heartbeat", "0.5", "--lease", "2"],
            cwd=REPO, env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


def wait_for(predicate, timeout: float, what: str, worker: Worker | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if worker is not None and worker.proc.poll() is not None:
            pytest.fail(f"worker exited ({worker.proc.returncode}) while waiting for {what}:\n"
                        f"{worker.log.read_text()[-3000:]}")
        time.sleep(0.02)
    log = worker.log.read_text()[-3000:] if worker is not None else ""
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}\n{log}")


def records_of(out: Path) -> dict[int, bytes]:
    """Every record of a job folder by plan index (duplicates would fail the assert)."""
    found: dict[int, bytes] = {}
    for path in shard_paths(out):
        reader = ShardReader(path)
        for i, entry in enumerate(reader.manifest.records):
            assert entry.index not in found, f"record {entry.index} in two shards"
            found[entry.index] = reader.raw(i)
        reader.close()
    return found


@pytest.fixture(scope="module")
def spec(tiny_dgnet) -> JobSpec:
    """The job as a client names it: a model and a data set under the server's roots."""
    root = tiny_dgnet["root"]
    assert tiny_dgnet["dgnet"].is_relative_to(root / "dgnet") and tiny_dgnet["data"] == root / "data"
    return JobSpec(kind="dgnet_random_structures", checkpoint="dgnet", data="data",
                   subset=16, structures_per_image=3, shard_size=12, batch_size=4, seed=7)


@pytest.fixture(scope="module")
def in_process(spec, tiny_dgnet, tmp_path_factory) -> dict[int, bytes]:
    """The reference: the same spec made by the in-process path (paths, one torch thread, as the
    workers)."""
    from worker.run import run_job

    out = tmp_path_factory.mktemp("inproc")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_job(spec.model_copy(update={"checkpoint": str(tiny_dgnet["dgnet"]), "data": str(tiny_dgnet["data"])}),
                out, device="cpu", progress=False)
    finally:
        torch.set_num_threads(threads)
    return records_of(out)


@pytest.fixture(scope="module")
def http(broker, tiny_dgnet):
    """The generator service with the Celery jobs backend (requests go through the real app)."""
    from fastapi.testclient import TestClient

    from generator_service.http import create_app
    from generator_service.inference.engine import Engine
    from worker.jobs import CeleryJobs

    app = create_app(Engine.from_checkpoint(tiny_dgnet["dgnet"], "cpu"), broker["roots"],
                     jobs=CeleryJobs(broker["store"], broker["app"]))
    return TestClient(app)


def test_job_of_several_shards_matches_the_plan_and_the_in_process_path(broker, http, spec, in_process, tmp_path):
    from api_schemas.jobs import JobStatus

    plan = make_plan(spec, broker["roots"].data_root / "data")
    assert plan.shards == 4 and plan.records == 48
    worker = Worker(broker, "w-complete")
    try:
        r = http.post("/v1/jobs", json={"spec": spec.model_dump(mode="json"), "out": str(tmp_path)})
        assert r.status_code == 202, r.text
        job = r.json()["id"]
        assert r.headers["location"] == f"/v1/jobs/{job}" and r.json()["shards_total"] == 4

        def finished():
            s = JobStatus.model_validate(http.get(f"/v1/jobs/{job}").json())
            return s.state in ("done", "failed") and s

        status = wait_for(finished, 300, "the job to finish", worker)
    finally:
        worker.stop()
    assert status.state == "done", status.errors
    assert (status.shards_done, status.shards_total) == (4, 4)
    assert status.records_done == 48 and status.records_failed == 0 and status.images_per_s > 0
    report = verify(tmp_path)
    assert report.ok and report.records == 48 and report.in_progress == 0, report.summary()
    records = records_of(tmp_path)
    assert sorted(records) == list(range(plan.records))
    assert records == in_process  # byte for byte: labels, soft labels and encoded images


def test_worker_killed_mid_shard_is_redone_at_once_and_the_job_says_so(broker, spec, in_process, tmp_path):
    """Two workers; one is SIGKILLed (its whole process group) in the middle of a shard, after
    another shard is done. Its lease runs out (2 s here, 30 s by default), the other worker's
    watchdog queues the shard again, and the job ends complete: no record lost or twice, the
    records those of the in-process path, and the job record tells which shard was redone."""
    from generator_service.http import Settings
    from worker.jobs import submit_job

    defaults = Settings()
    assert defaults.lease_s + defaults.heartbeat_s <= 60  # noticed within a minute: redone well within 2
    survivor = Worker(broker, "w-survivor")
    doomed = Worker(broker, "w-doomed")
    job = submit_job(JobRequest(spec=spec, out=str(tmp_path)), broker["store"], broker["app"], broker["roots"])
    running = f"{broker['env']['REIDGEN_REDIS_PREFIX']}job:{job}:running"
    client = broker["store"].r

    def doomed_mid_shard():
        """The shard the doomed worker is making, once another is done; checked with the worker
        frozen (SIGSTOP), so that it cannot finish the shard between the look and the kill."""
        held = {int(k): v.decode() for k, v in client.hgetall(running).items()}
        mine = [i for i, w in held.items() if w.startswith("w-doomed@")]
        if not (mine and shard_paths(tmp_path)):
            return None
        os.killpg(doomed.proc.pid, signal.SIGSTOP)
        if (tmp_path / f"shard-{mine[0]:05d}").exists():  # it has just finished: let it go on
            os.killpg(doomed.proc.pid, signal.SIGCONT)
            return None
        return [mine[0]]

    try:
        [killed] = wait_for(doomed_mid_shard, 300, "the doomed worker to be in the middle of a shard", doomed)
        doomed.kill()
        killed_at = time.monotonic()
        wait_for(lambda: (tmp_path / f"shard-{killed:05d}" / "manifest.json").is_file(), 60,
                 "the killed worker's shard to be redone", survivor)
        redone_after = time.monotonic() - killed_at
        status = wait_for(lambda: (s := broker["store"].status(job)).state in ("done", "failed") and s, 120,
                          "the job to finish", survivor)
    finally:
        doomed.kill()
        survivor.stop()
    print(f"shard {killed} redone {redone_after:.1f} s after the kill")
    assert redone_after < 20, redone_after  # lease 2 s + a watchdog round + one shard on a shared core
    assert status.state == "done", status.errors
    assert status.shards_done == 4 and status.records_done == 48
    assert status.shards_redone == 1
    [event] = status.events
    assert event.shard == killed and event.code == "worker_lost" and "queued again" in event.message
    report = verify(tmp_path)
    assert report.ok and report.records == 48 and not report.duplicates and not report.corrupt, report.summary()
    assert report.in_progress == 0  # the killed worker's half-written shard was discarded
    assert records_of(tmp_path) == in_process


def test_cancelled_job_runs_no_shard(broker, http, spec, tmp_path):
    from worker.jobs import submit_job

    job = submit_job(JobRequest(spec=spec, out=str(tmp_path)), broker["store"], broker["app"], broker["roots"])
    r = http.delete(f"/v1/jobs/{job}")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    worker = Worker(broker, "w-cancel")
    try:
        # The queue drains (revoked or skipped tasks) without any shard being made.
        client = broker["store"].r
        queue_key = f"{broker['env']['REIDGEN_REDIS_PREFIX']}{broker['env']['REIDGEN_QUEUE']}"
        # Deadlines are generous: on a loaded 2-core machine a worker takes a while to import torch.
        wait_for(lambda: client.llen(queue_key) == 0, 300, "the cancelled job's tasks to be consumed", worker)
    finally:
        worker.stop()
    assert shard_paths(tmp_path) == []
    assert broker["store"].status(job).state == "cancelled"


def test_jobs_endpoint_errors(http, spec, tiny_dgnet, tmp_path):
    from fastapi.testclient import TestClient

    from generator_service.http import create_app
    from reidgen.core.errors import ReidgenError

    missing = "0" * 32
    r = http.get(f"/v1/jobs/{missing}")
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_job"
    assert http.delete(f"/v1/jobs/{missing}").status_code == 404
    assert http.get("/v1/jobs/not-an-id").status_code == 422
    body = {"spec": spec.model_dump(mode="json"), "out": str(tmp_path)}
    r = http.post("/v1/jobs", json={**body, "spec": {**body["spec"], "shard_size": 0}})
    assert r.status_code == 422 and "shard_size" in r.json()["error"]["message"]
    r = http.post("/v1/jobs", json={**body, "spec": {**body["spec"], "data": "nowhere"}})
    assert r.status_code == 400 and "not found" in r.json()["error"]["message"]
    r = http.post("/v1/jobs", json={**body, "spec": {**body["spec"], "data": str(tmp_path)}})  # outside the root
    assert r.status_code == 400 and r.json()["error"]["code"] == "path_not_allowed"
    assert http.post("/v1/jobs", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
    with pytest.raises(ReidgenError, match="roots"):  # a service with jobs confines them, or does not start
        create_app(http.app.state.engine, jobs=http.app.state.jobs)
    without = TestClient(create_app(http.app.state.engine))  # a service without a broker has no /v1/jobs
    assert without.post("/v1/jobs", json=body).status_code == 404
    assert "/v1/jobs" in http.get("/openapi.json").json()["paths"]
    assert "/v1/jobs" not in without.get("/openapi.json").json()["paths"]
