"""No 4xx body holds a server path (issue 23, item 2).

Every app the suite makes records its 4xx answers (`tests.error_bodies`, installed by conftest);
this module runs last. It sends the job-submission errors of the hostile-client probe itself (so
that it checks them when run alone too), then checks every answer recorded in the run: none may
hold the path of one of its server's roots unless the request sent that path itself.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from reidgen.core.checkpoint import save_checkpoint
from tests import error_bodies


@pytest.fixture
def place(tmp_path) -> Path:
    """A shards and models root with every kind of unusable ``out`` of the probe and a DG-Net
    checkpoint (its header only: no worker runs), and a data root."""
    root = tmp_path / "root"
    save_checkpoint(root / "dgnet.pt", "dgnet", {})
    (root / "afile").write_text("not a folder")
    (root / "junk").mkdir()
    (root / "junk" / "job.json").write_text("{not json")
    (root / "foreign").mkdir()
    (root / "foreign" / "job.json").write_text(json.dumps({"format": "something-else"}))
    (root / "manifest-folder" / "job.json").mkdir(parents=True)
    (root / "escape").symlink_to(tmp_path)
    return root


@pytest.fixture
def http(broker, place, market_mini):
    from fastapi.testclient import TestClient

    from generator_service.http import Settings, create_app
    from generator_service.inference.engine import Engine, ServedModel
    from worker.celery_app import make_app
    from worker.jobs import CeleryJobs, JobStore

    stand_in = ServedModel(name="stand-in", kind="dgnet", checkpoint="stand-in.pt", identity="0", step=None,
                           preset=None, image_size=(128, 64), net=None)
    settings = Settings(models_root=place, data_root=market_mini.parent, shards_root=place)
    app = create_app(Engine([stand_in], "cpu"), settings, jobs=CeleryJobs(JobStore(broker["client"],
                                                                                   broker["prefix"]), make_app()))
    return TestClient(app, raise_server_exceptions=False)


def spec(**fields) -> dict:
    base = {"kind": "dgnet_random_structures", "checkpoint": "dgnet", "data": "market1501_mini", "subset": 4,
            "structures_per_image": 1, "shard_size": 64}
    return {**base, **fields}


# Relative names, as a client that does not know the root sends them.
OUTS = ["afile", "afile/sub", "junk", "foreign", "manifest-folder", "escape", "escape/deeper", "", "a\0b",
        "../up", ".", "x" * 300]


@pytest.mark.parametrize("out", OUTS, ids=range(len(OUTS)))
def test_job_submission_errors_hold_no_root_path(http, place, out):
    before = len(error_bodies.RECORDED)
    answer = http.post("/v1/jobs", json={"spec": spec(), "out": out})
    assert 400 <= answer.status_code < 500, answer.text
    mine = error_bodies.RECORDED[before:]
    assert mine and mine[-1].status == answer.status_code
    assert str(place) not in answer.text and str(place.resolve()) not in answer.text, answer.text
    assert error_bodies.leaks(mine) == []


@pytest.mark.parametrize("field, value", [("checkpoint", "escape/x.pt"), ("checkpoint", "/etc/passwd"),
                                          ("teacher", "escape/t.pt"), ("data", "nowhere"), ("data", "../x")])
def test_spec_name_errors_hold_no_root_path(http, place, field, value):
    answer = http.post("/v1/jobs", json={"spec": spec(**{field: value}), "out": "fresh"})
    assert 400 <= answer.status_code < 500, answer.text
    assert str(place) not in answer.text and str(place.resolve()) not in answer.text, answer.text


def test_a_job_in_another_jobs_folder_names_it_without_the_root(http, place, market_mini):
    other = {"spec": spec(checkpoint="dgnet", seed=1), "out": "taken"}
    from api_schemas.jobs import JobManifest, JobSpec

    (place / "taken").mkdir()
    (place / "taken" / "job.json").write_text(JobManifest(spec=JobSpec(**other["spec"]), plan_hash="0" * 16,
                                                          shards=1, records_planned=4).model_dump_json())
    answer = http.post("/v1/jobs", json={"spec": spec(), "out": "taken"})
    assert answer.status_code == 400 and "another job" in answer.text, answer.text
    assert str(place) not in answer.text


def test_no_4xx_body_of_the_whole_run_holds_a_root_path():
    """Over every 4xx answer recorded in this run (all test modules before this one)."""
    assert error_bodies.RECORDED, "no app recorded its answers: is tests.error_bodies installed?"
    leaks = error_bodies.leaks()
    assert leaks == [], f"{len(leaks)} of {len(error_bodies.RECORDED)} 4xx bodies hold a root path:\n" + \
        "\n".join(leaks[:20])
