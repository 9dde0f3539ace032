"""Errors without internals (issue 12, item 4): what an HTTP client reads names the field and
the value it sent, with a stable code, and nothing of the server: no traceback, no source or
data path, no bytes of a file it named. The details go to the log, tagged with the request id
(HTTP) or the job id (a job's shards).

Through the real app with the Celery jobs backend on a real Redis (``$REDIS_URL``, database 13,
a key prefix and queue of this run); the job's shard runs in this process through the Celery
task's own function, so no worker process is needed.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from api_schemas.service import ErrorBody
from reidgen.core.checkpoint import save_checkpoint
from reidgen.core.paths import data_root

REPO = Path(__file__).resolve().parents[1]
# Its first byte is 'w': torch's refusal quotes it ("invalid load key, 'w'", "Unsupported operand 119").
FILE_BYTES = b"what the server keeps here: SECRET-BYTES\n"


def _stand_in_engine():
    from generator_service.inference.engine import Engine, ServedModel

    stand_in = ServedModel(name="stand-in", kind="dgnet", checkpoint="stand-in.pt", identity="0", step=None,
                           preset=None, image_size=(128, 64), net=None)
    return Engine([stand_in], "cpu")


@pytest.fixture(scope="module")
def store(broker):
    from worker.jobs import JobStore

    return JobStore(broker["client"], broker["prefix"])


def roots(place: Path):
    from generator_service.http import Settings

    return Settings(models_root=place, data_root=data_root(), shards_root=place)


@pytest.fixture
def http(broker, store, place):
    """The real app with the Celery jobs backend, its models and shards roots the test's place;
    the jobs routes never touch the engine."""
    from fastapi.testclient import TestClient

    from generator_service.http import create_app
    from worker.celery_app import make_app
    from worker.jobs import CeleryJobs

    return TestClient(create_app(_stand_in_engine(), roots(place), jobs=CeleryJobs(store, make_app())),
                      raise_server_exceptions=False)


@pytest.fixture
def place(tmp_path, monkeypatch, market_mini) -> Path:
    """The cwd of the test (the client names files relative to it) holding a junk 'checkpoint' and a
    DG-Net checkpoint's header (no weights: it passes the check at submission, not a worker's load)."""
    (tmp_path / "junk.pt").write_bytes(FILE_BYTES)
    save_checkpoint(tmp_path / "model.pt", "dgnet", {})
    monkeypatch.chdir(tmp_path)
    # The roots of the worker (the task runs in this process): its models and shards are here too.
    monkeypatch.setenv("REIDGEN_MODELS_ROOT", str(tmp_path))
    monkeypatch.setenv("REIDGEN_SHARDS_ROOT", str(tmp_path))
    return tmp_path


def spec(**changes) -> dict:
    return {"kind": "dgnet_random_structures", "checkpoint": "model.pt", "data": "market1501_mini", "subset": 4,
            "structures_per_image": 1, "shard_size": 64, **changes}


def assert_no_internals(text: str, *server_paths: Path) -> None:
    """No traceback, no file bytes, no exception text of a loader, no server path."""
    for leak in ("Traceback", 'File "', "SECRET-BYTES", "invalid load key", "operand", "UnpicklingError",
                 str(REPO), str(data_root()), *map(str, server_paths)):
        assert leak not in text, f"{leak!r} leaked: {text}"


def error_body(response, status: int) -> ErrorBody:
    """The app's error shape, with a request id that is the response's X-Request-ID."""
    assert response.status_code == status, response.text
    body = ErrorBody.model_validate(response.json())
    assert body.error.code and body.error.message
    assert body.error.request_id and body.error.request_id == response.headers["x-request-id"]
    return body


def run_shard_here(broker, monkeypatch, job_id: str, index: int = 0) -> dict:
    """One shard of a queued job through the Celery task's function, in this process."""
    import worker.tasks as tasks
    from worker.jobs import JobStore

    monkeypatch.setattr(tasks, "_store", JobStore(broker["client"], broker["prefix"]))
    record = {k.decode(): v.decode() for k, v in broker["client"].hgetall(f"{broker['prefix']}job:{job_id}").items()}
    return tasks.generate_shard_task(job_id, record["spec"], record["out"], index)


def test_a_job_with_a_junk_checkpoint_is_refused_without_internals(http, place):
    """At submission: a junk file and a missing one get the same 400, so a client cannot probe the
    server's files."""
    junk = http.post("/v1/jobs", json={"spec": spec(checkpoint="junk.pt"), "out": "shards"})
    missing = http.post("/v1/jobs", json={"spec": spec(checkpoint="missing.pt"), "out": "shards"})
    assert_no_internals(junk.text, place)
    junk, missing = error_body(junk, 400).error, error_body(missing, 400).error
    assert junk.code == missing.code == "bad_checkpoint"
    assert junk.message.startswith("spec.checkpoint: no reidgen DG-Net checkpoint named 'junk.pt'")
    assert missing.message == junk.message.replace("junk.pt", "missing.pt")
    assert not (place / "shards").exists()


def test_a_checkpoint_that_turned_junk_fails_its_job_without_internals(http, broker, place, monkeypatch, caplog):
    """On the worker: a checkpoint the submission took, junk (or gone) by the time a worker loads it."""
    submitted = http.post("/v1/jobs", json={"spec": spec(), "out": "shards"})
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    gone = http.post("/v1/jobs", json={"spec": spec(seed=1), "out": "other"}).json()
    (place / "model.pt").write_bytes(FILE_BYTES)
    with caplog.at_level(logging.INFO, logger="reidgen.worker"):
        assert run_shard_here(broker, monkeypatch, job_id)["status"] == "failed"

    status = http.get(f"/v1/jobs/{job_id}")
    assert status.status_code == 200 and status.json()["state"] == "failed"
    assert_no_internals(status.text, place)
    [detail] = status.json()["error_details"]
    assert detail["code"] == "bad_checkpoint" and detail["shard"] == 0
    assert detail["message"].startswith("checkpoint: no readable reidgen dgnet checkpoint named 'model.pt'")
    assert status.json()["errors"] == [f"shard 0: bad_checkpoint: {detail['message']}"]
    # The same answer for a checkpoint that no longer exists: a client cannot probe the server's files.
    (place / "model.pt").unlink()
    run_shard_here(broker, monkeypatch, gone["id"])
    [other] = http.get(f"/v1/jobs/{gone['id']}").json()["error_details"]
    assert other["message"] == detail["message"]

    logged = [r for r in caplog.records if job_id in r.getMessage()]
    assert any("model.pt cannot be read" in r.getMessage() for r in logged), [r.getMessage() for r in caplog.records]


def test_a_job_failing_on_a_bug_shows_no_traceback(http, broker, place, monkeypatch, caplog):
    import worker.tasks as tasks

    def broken(*_args, **_kwargs):
        raise RuntimeError(f"bug while reading {place / 'junk.pt'}")

    submitted = http.post("/v1/jobs", json={"spec": spec(seed=2), "out": "bug"}).json()
    monkeypatch.setattr(tasks, "load_runtime", broken)
    with caplog.at_level(logging.INFO, logger="reidgen.worker"), pytest.raises(RuntimeError):
        run_shard_here(broker, monkeypatch, submitted["id"])
    status = http.get(f"/v1/jobs/{submitted['id']}")
    assert_no_internals(status.text, place)
    assert status.json()["error_details"][0]["code"] == "internal_error"
    [record] = [r for r in caplog.records if submitted["id"] in r.getMessage()]
    assert record.exc_info is not None and "bug while reading" in str(record.exc_info[1])


def test_an_error_recorded_by_an_older_worker_is_not_shown(http, broker, store, place):
    submitted = http.post("/v1/jobs", json={"spec": spec(seed=3), "out": "old"}).json()
    broker["client"].rpush(f"{broker['prefix']}job:{submitted['id']}:errors",
                           f'shard 0: Traceback (most recent call last):\n  File "{REPO}/worker/run.py"')
    status = http.get(f"/v1/jobs/{submitted['id']}")
    assert_no_internals(status.text, place)
    assert status.json()["error_details"][0]["code"] == "internal_error"


def test_unknown_data_names_the_field_not_the_data_root(http, place, caplog):
    with caplog.at_level(logging.INFO, logger="reidgen.service"):
        r = http.post("/v1/jobs", json={"spec": spec(data="no-such-data"), "out": "x"},
                      headers={"X-Request-ID": "client-chosen.id-1"})
    body = error_body(r, 400)
    assert body.error.request_id == "client-chosen.id-1"
    assert body.error.code == "unknown_data"
    assert body.error.message.startswith("data: data set 'no-such-data' not found")
    assert_no_internals(r.text, place)
    [record] = [r for r in caplog.records if "client-chosen.id-1" in r.getMessage()]
    assert str(data_root()) in record.getMessage()  # the operator's side has the whole story
    assert not (place / "x").exists()


@pytest.mark.parametrize("given", [None, "", "has spaces", "x" * 65, "semi;colon", "é"])
def test_an_odd_or_missing_request_id_is_replaced(http, given):
    headers = {} if given is None else {"X-Request-ID": given.encode("utf-8")}
    r = http.get(f"/v1/jobs/{'0' * 32}", headers=headers)
    body = error_body(r, 404)
    assert body.error.code == "unknown_job" and body.error.request_id != given
    assert len(body.error.request_id) == 32 and int(body.error.request_id, 16) >= 0


def test_request_id_is_echoed_on_success_and_on_errors_before_routing(http):
    ok = http.get("/v1/healthz", headers={"X-Request-ID": "probe-7"})
    assert ok.status_code == 200 and ok.headers["x-request-id"] == "probe-7"
    error_body(http.get("/v1/nowhere"), 404)
    error_body(http.post("/v1/jobs", content=b"x", headers={"content-type": "text/plain"}), 415)


def test_an_unhandled_error_is_a_500_with_the_request_id_and_a_logged_traceback(place, caplog):
    from fastapi.testclient import TestClient

    from generator_service.http import create_app

    class Broken:
        def submit(self, request, settings):
            raise RuntimeError(f"bug at {place / 'junk.pt'}")

        def status(self, job_id):
            raise LookupError(job_id)

        cancel = status

    client = TestClient(create_app(_stand_in_engine(), roots(place), jobs=Broken()), raise_server_exceptions=False)
    with caplog.at_level(logging.INFO, logger="reidgen.service"):
        r = client.post("/v1/jobs", json={"spec": spec(), "out": "y"}, headers={"X-Request-ID": "req-500"})
    body = error_body(r, 500)
    assert body.error.code == "internal_error" and body.error.request_id == "req-500"
    assert_no_internals(r.text, place)
    [record] = [r for r in caplog.records if "req-500" in r.getMessage()]
    assert record.exc_info is not None and "bug at" in str(record.exc_info[1])
