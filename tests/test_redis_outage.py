"""A Redis outage while a worker makes a shard (a restart, Redis still loading its data) must not
fail the shard or the job: the worker's calls to the job record are retried (`worker.jobs.retrying`),
the cancellation check reads "unreachable" as "not cancelled", the counters count once, a lease
that ran out is set again by its heartbeat, and the watchdog declares nothing lost.

The shared test Redis is never restarted: the job store's client is wrapped so that every call
fails with redis-py's own ConnectionError while an outage is on. The shard tasks run in this
process (the real task function, a fake Celery app that queues in a list), on the tiny DG-Net.
"""
from __future__ import annotations

import time

import pytest
import redis

from api_schemas.jobs import JobRequest, JobSpec
from worker.jobs import JobStore, JobStoreUnavailable, Watchdog, retrying

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Outage:
    """While on, every call through a `Flaky` client fails as a refused connection does."""

    def __init__(self):
        self.until = 0.0
        self.failures: dict[str, int] = {}

    def start(self, seconds: float) -> None:
        self.until = time.monotonic() + seconds

    def check(self, name: str) -> None:
        if time.monotonic() < self.until:
            self.failures[name] = self.failures.get(name, 0) + 1
            raise redis.exceptions.ConnectionError("Error 111 connecting to redis:6379. Connection refused.")


class Flaky:
    """A Redis client (or pipeline) whose calls go through `Outage.check` first."""

    def __init__(self, real, outage: Outage, on_call=None):
        self._real, self._outage, self._on_call = real, outage, on_call

    def __getattr__(self, name):
        attr = getattr(self._real, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            if self._on_call is not None:
                self._on_call(name, args)
            self._outage.check(name)
            result = attr(*args, **kwargs)
            return Flaky(result, self._outage) if name == "pipeline" else result
        return call


class FakeApp:
    """Celery's ``send_task``, queueing into a list that the test runs in order."""

    def __init__(self):
        self.queue: list[tuple] = []
        self.sent = 0

    def send_task(self, name, args, **_):
        self.queue.append(args)
        self.sent += 1

        class Result:
            id = f"task-{self.sent}"
        return Result()


@pytest.fixture
def flaky_store(broker):
    outage = Outage()
    return outage, JobStore(Flaky(broker["client"], outage), broker["prefix"], retry_s=10)


def test_redis_outage_mid_shard_neither_fails_the_shard_nor_the_job(broker, tiny_dgnet, tmp_path_factory,
                                                                    monkeypatch):
    import worker.tasks as tasks
    from generator_service.http import Settings
    from tests.test_worker import records_of
    from worker.jobs import submit_job
    from worker.plans import make_plan

    outage = Outage()
    checks = {"n": 0}

    def on_call(name, args):  # Redis goes away at the 2nd cancellation check of the first shard
        if name == "hget" and len(args) > 1 and args[1] == "state":
            checks["n"] += 1
            if checks["n"] == 3:  # (the 1st is the task's state check before the shard)
                outage.start(1.2)

    store = JobStore(Flaky(broker["client"], outage, on_call), broker["prefix"], retry_s=10)
    root = tiny_dgnet["root"]
    shards_root = tmp_path_factory.mktemp("outage-shards")
    settings = Settings(models_root=root, data_root=root, shards_root=shards_root, min_shard_size=1,
                        dispatch_window=1, heartbeat_s=0.2, lease_s=1.0)
    app = FakeApp()
    monkeypatch.setattr(tasks, "_store", store)
    monkeypatch.setattr(tasks, "app", app)
    monkeypatch.setattr(tasks, "settings", lambda: settings)
    spec = JobSpec(kind="dgnet_random_structures", checkpoint="dgnet", data="data", subset=16,
                   structures_per_image=3, shard_size=12, batch_size=4, seed=7)
    job_id = submit_job(JobRequest(spec=spec, out="job"), store, app, settings)

    # Another worker's watchdog, on the same (flaky) Redis: it must not take the shard as lost
    # when its lease runs out during the outage.
    watchdog = Watchdog(app, settings.heartbeat_s, settings.lease_s,
                        JobStore(Flaky(broker["client"], outage), broker["prefix"], retry_s=10))
    watchdog.start()
    try:
        while app.queue:
            args = app.queue.pop(0)
            result = tasks.generate_shard_task(*args)
            assert result["status"] == "done", result
    finally:
        watchdog.stop()
        watchdog.join(5)

    assert outage.failures.get("hget", 0) >= 1, "the outage never hit a cancellation check"
    assert sum(outage.failures.values()) >= 3, outage.failures
    status = store.status(job_id)
    plan = make_plan(spec.model_copy(update={"checkpoint": str(tiny_dgnet["dgnet"]),
                                             "data": str(tiny_dgnet["data"])}))
    assert status.state == "done", status
    assert (status.shards_done, status.shards_total) == (plan.shards, plan.shards)
    assert status.records_done == plan.records and status.records_failed == 0
    assert status.errors == [] and status.shards_redone == 0 and status.events == []
    records = records_of(shards_root / "job")  # fails on a record in two shards
    assert sorted(records) == list(range(plan.records))
    assert app.sent == plan.shards  # no shard queued twice


def test_counters_and_claims_count_once_when_a_call_is_repeated(broker, flaky_store):
    """A repeat after a lost reply (the command ran, its answer did not come back) adds nothing."""
    _, store = flaky_store
    job_id = "outage-repeat"
    key = store._key(job_id)
    broker["client"].hset(key, mapping={"state": "running", "shards_total": 2, "records_done": 0,
                                        "records_failed": 0, "dispatched": 0})
    for _ in range(2):
        store.shard_finished(job_id, 0, 12, 1)
    assert int(broker["client"].hget(key, "records_done")) == 12
    assert int(broker["client"].hget(key, "records_failed")) == 1
    assert broker["client"].hget(key, "state") == b"running"
    store.shard_finished(job_id, 1, 12, 0)
    assert broker["client"].hget(key, "state") == b"done"


def test_cancellation_check_waits_out_an_outage_then_fails_clearly(broker, flaky_store):
    outage, store = flaky_store
    store.retry_s = 0.3
    broker["client"].hset(store._key("outage-cancel"), "state", "running")
    outage.start(0.6)
    started = time.monotonic()
    assert store.cancelled("outage-cancel") is False  # unreachable: not cancelled, ask again later
    with pytest.raises(JobStoreUnavailable) as info:
        while time.monotonic() - started < 2:
            assert store.cancelled("outage-cancel") is False
            time.sleep(0.05)
    assert info.value.code == "job_store_unavailable"
    assert "redis:6379" not in info.value.public and "Connection refused" not in info.value.public
    time.sleep(max(0.0, outage.until - time.monotonic()))
    assert store.cancelled("outage-cancel") is False  # back: the outage's clock starts over


def test_retrying_is_bounded():
    calls = []

    def refused():
        calls.append(time.monotonic())
        raise redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory")

    started = time.monotonic()
    with pytest.raises(JobStoreUnavailable):
        retrying(refused, "renewed a shard's lease", 0.5)
    assert 0.5 <= time.monotonic() - started < 1.5 and len(calls) >= 3
    assert retrying(lambda: 7, "read a job's state", 0.5) == 7


def test_lease_that_ran_out_during_an_outage_is_set_again_by_its_worker(broker, flaky_store):
    _, store = flaky_store
    job_id = "outage-lease"
    store.shard_started(job_id, 3, "w1", lease_s=0.05)
    time.sleep(0.1)  # Redis away longer than the lease
    assert not broker["client"].exists(store._key(job_id, "lease:3"))
    assert store.renew(job_id, 3, 5.0, "w1") == 2
    assert broker["client"].exists(store._key(job_id, "lease:3"))
    assert store.renew(job_id, 3, 5.0, "w1") == 1
    store.shard_released(job_id, 3)
    assert store.renew(job_id, 3, 5.0, "w1") == 0  # no longer this worker's: not set again


def test_watchdog_waits_one_lease_after_redis_comes_back(broker, flaky_store):
    outage, store = flaky_store
    watchdog = Watchdog(FakeApp(), 0.05, 0.4, store)
    outage.start(0.2)
    assert watchdog.round(store) == [] and watchdog._redis_away
    time.sleep(0.25)
    watchdog.round(store)
    assert not watchdog._redis_away and watchdog._quiet_until > time.monotonic() + 0.3


def test_the_api_answers_503_within_seconds_while_redis_is_down(broker, market_mini, tmp_path):
    from fastapi.testclient import TestClient

    from generator_service.http import Settings, create_app
    from generator_service.inference.engine import Engine, ServedModel
    from worker.jobs import API_STORE_RETRY_S, CeleryJobs

    outage = Outage()
    jobs = CeleryJobs(JobStore(Flaky(broker["client"], outage), broker["prefix"], retry_s=API_STORE_RETRY_S),
                      FakeApp())
    settings = Settings(models_root=tmp_path, data_root=market_mini.parent, shards_root=tmp_path)
    stand_in = ServedModel(name="stand-in", kind="dgnet", checkpoint="stand-in.pt", identity="0", step=None,
                           preset=None, image_size=(128, 64), net=None)
    client = TestClient(create_app(Engine([stand_in], "cpu"), settings, jobs=jobs), raise_server_exceptions=False)
    outage.start(60)
    spec = {"kind": "dgnet_random_structures", "checkpoint": "dgnet", "data": market_mini.name, "subset": 4,
            "structures_per_image": 1, "shard_size": 64}
    for method, path, body in (("GET", "/v1/jobs/" + "0" * 32, None),
                               ("POST", "/v1/jobs", {"spec": spec, "out": "outage"})):
        start = time.monotonic()
        response = client.request(method, path, json=body)
        waited = time.monotonic() - start
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "job_store_unavailable"
        assert response.headers["Retry-After"] == "5"
        assert waited < API_STORE_RETRY_S + 2  # not the workers' 60 s
