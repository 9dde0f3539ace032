"""Bad job paths are the client's mistake: a 4xx with one message naming the field, never a 500.

Through the real app (`create_app` with the Celery jobs backend on a real Redis, ``$REDIS_URL``,
database 13 with a key prefix and queue of its own) and the in-process `reidgen generate`:

- ``out`` naming a file, a path under a file, a folder whose ``job.json`` is junk or a folder;
- a NUL character in ``out`` or in a path of the spec (data, checkpoint, teacher);
- odd job ids on ``GET /v1/jobs/{id}``.

Each answer has the app's error shape (`ErrorBody`), and nothing is written: no file or folder
(the cwd included, where a relative path would land), no job record, no queued task. No worker
runs: the spec's checkpoint is a checkpoint's header only (no weights), enough for the server's
check at submission (a name that is no DG-Net checkpoint is its own 400), so the answers here
come from ``out``; the service needs no real model either.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from api_schemas.service import ErrorBody
from reidgen.cli import main
from reidgen.core.checkpoint import save_checkpoint

JUNK = "{not json, SECRET-BYTES"  # must never reach the client


@pytest.fixture
def http(broker, place, market_mini):
    """The real app with the Celery jobs backend, its shards and models roots the test's place. The
    jobs routes never touch the engine, so it serves a stand-in model (no checkpoint to train for
    these tests)."""
    from fastapi.testclient import TestClient

    from generator_service.http import Settings, create_app
    from generator_service.inference.engine import Engine, ServedModel
    from worker.celery_app import make_app
    from worker.jobs import CeleryJobs, JobStore

    stand_in = ServedModel(name="stand-in", kind="dgnet", checkpoint="stand-in.pt", identity="0", step=None,
                           preset=None, image_size=(128, 64), net=None)
    jobs = CeleryJobs(JobStore(broker["client"], broker["prefix"]), make_app())
    roots = Settings(models_root=place, data_root=market_mini.parent, shards_root=place)
    return TestClient(create_app(Engine([stand_in], "cpu"), roots, jobs=jobs), raise_server_exceptions=False)


@pytest.fixture
def spec(market_mini) -> dict:
    return {"kind": "dgnet_random_structures", "checkpoint": "dgnet.pt", "data": str(market_mini),
            "subset": 4, "structures_per_image": 1, "shard_size": 64}


@pytest.fixture
def place(tmp_path, monkeypatch) -> Path:
    """A folder holding every bad ``out`` of a test and the spec's checkpoint (a header only), and
    the cwd (relative paths land there)."""
    save_checkpoint(tmp_path / "dgnet.pt", "dgnet", {})
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "junk-manifest").mkdir()
    (tmp_path / "junk-manifest" / "job.json").write_text(JUNK)
    (tmp_path / "other-manifest").mkdir()
    (tmp_path / "other-manifest" / "job.json").write_text(json.dumps({"format": "something-else"}))
    (tmp_path / "manifest-folder" / "job.json").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for a folder)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def redis_keys(broker) -> set[bytes]:
    return set(broker["client"].scan_iter(f"{broker['prefix']}*"))


# (out relative to the place, status, words the message must hold)
BAD_OUTS = [
    ("a-file", 400, "it exists and is not a folder"),
    ("a-file/sub", 400, "a part of it is a file, not a folder"),
    ("junk-manifest", 400, "holds a job.json that is not a reidgen job manifest"),
    ("other-manifest", 400, "holds a job.json that is not a reidgen job manifest"),
    ("manifest-folder", 400, "its job.json is a folder"),
    ("new\0folder", 400, "must not contain a NUL character"),
    ("\0", 400, "must not contain a NUL character"),
]


def error_of(response, status: int) -> str:
    """The message of an error answer, checked to have the app's error shape and ``status``."""
    assert response.status_code == status, response.text
    body = ErrorBody.model_validate(response.json())
    assert body.error.code in ("bad_request", "invalid_request", "path_not_allowed")
    assert "Traceback" not in body.error.message and "SECRET-BYTES" not in body.error.message
    return body.error.message


@pytest.mark.parametrize("out, status, words", BAD_OUTS, ids=[o.replace("\0", "NUL") for o, _, _ in BAD_OUTS])
@pytest.mark.parametrize("absolute", [True, False], ids=["absolute", "relative"])
def test_post_job_with_a_bad_out_is_a_4xx_and_writes_nothing(http, broker, spec, place, out, status, words,
                                                             absolute):
    before, keys = snapshot(place), redis_keys(broker)
    given = str(place / out) if absolute else out
    message = error_of(http.post("/v1/jobs", json={"spec": spec, "out": given}), status)
    assert message.startswith("out: ") and words in message
    assert snapshot(place) == before
    assert redis_keys(broker) == keys  # no job record, no queued task


@pytest.mark.parametrize("field", ["data", "checkpoint", "teacher"])
def test_post_job_with_a_nul_in_a_spec_path_is_a_4xx_and_writes_nothing(http, broker, spec, place, field):
    before, keys = snapshot(place), redis_keys(broker)
    body = {"spec": {**spec, field: f"{spec.get(field) or 'teacher.pt'}\0.pt"}, "out": str(place / "fresh")}
    message = error_of(http.post("/v1/jobs", json=body), 400)
    assert message.startswith(f"spec.{field}: ") and "must not contain a NUL character" in message
    assert snapshot(place) == before and redis_keys(broker) == keys


def test_the_same_requests_with_a_good_out_are_accepted(http, broker, spec, place):
    """The control: the bad answers above come from ``out``, not from the spec or the setup."""
    body = {"spec": spec, "out": str(place / "fresh")}
    first = http.post("/v1/jobs", json=body)
    assert first.status_code == 202, first.text
    assert (place / "fresh" / "job.json").is_file()
    again = http.post("/v1/jobs", json=body)  # the folder of an earlier run of the same spec
    assert again.status_code == 202, again.text
    for job in (first.json()["id"], again.json()["id"]):
        assert http.get(f"/v1/jobs/{job}").status_code == 200


@pytest.mark.parametrize("job_id", ["%00", "0" * 31 + "%00", "%00" + "0" * 32, "0" * 33, "..%00"])
def test_get_job_with_an_odd_id_is_a_4xx(http, job_id):
    assert error_of(http.get(f"/v1/jobs/{job_id}"), 422).startswith("path.job_id: ")


def test_get_job_with_slashes_in_the_id_is_a_404(http):
    r = http.get("/v1/jobs/..%2F..%2Fetc")  # decoded into another path: no such endpoint
    assert r.status_code == 404 and ErrorBody.model_validate(r.json()).error.code == "not_found"


def test_get_job_unknown_id_is_a_404(http):
    r = http.get(f"/v1/jobs/{'0' * 32}")
    assert r.status_code == 404 and ErrorBody.model_validate(r.json()).error.code == "unknown_job"


# -- the in-process CLI: one line on stderr, exit 2 ----------------------------------------------
def generate(spec_file: Path, out: str, capsys) -> tuple[int, list[str]]:
    code = main(["generate", str(spec_file), "--out", out, "--device", "cpu", "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.err.splitlines()


@pytest.mark.parametrize("out, status, words", BAD_OUTS, ids=[o.replace("\0", "NUL") for o, _, _ in BAD_OUTS])
def test_generate_with_a_bad_out_is_one_line_and_exit_2(spec, place, capsys, out, status, words):
    spec_file = place.parent / f"{place.name}-spec.json"
    spec_file.write_text(json.dumps(spec))
    before = snapshot(place)
    code, err = generate(spec_file, str(place / out), capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("reidgen: error: out: ") and words in err[0]
    assert snapshot(place) == before


@pytest.mark.parametrize("field", ["data", "checkpoint", "teacher"])
def test_generate_with_a_nul_in_a_spec_path_is_one_line_and_exit_2(spec, place, capsys, field):
    spec_file = place.parent / f"{place.name}-spec.json"
    spec_file.write_text(json.dumps({**spec, field: "x\0y"}))
    before = snapshot(place)
    code, err = generate(spec_file, str(place / "fresh"), capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"reidgen: error: job spec {spec_file}: {field}: must not contain a NUL character")
    assert snapshot(place) == before
