"""The OpenAPI document is exact (issue 23, item 8): Schemathesis, an outside client that trusts
the document, finds no failure with every one of its checks; and each of the probe's findings,
reproduced as it was written, holds no more.

A real server on a loopback port (uvicorn, as `reidgen serve` runs it), with an API key, a real
tiny DG-Net (conftest's ``tiny_dgnet``) and the Celery jobs backend on Redis (no worker: a job
that is accepted stays queued). Schemathesis runs in-process on a fixed seed, with a few examples
per operation (its time is printed; the file runs in well under a minute of one core).
"""
from __future__ import annotations

import time

import httpx
import jsonschema_rs
import pytest

from api_schemas.service import EXAMPLE_PNG_BLUE, EXAMPLE_PNG_RED
from generator_service.http import Settings, create_app
from generator_service.inference.engine import Engine
from tests.live import Live

pytestmark = pytest.mark.usefixtures("one_torch_thread")

API_KEY = "schemathesis-key"
AUTH = {"X-API-Key": API_KEY}
JOB_ID = "0" * 32
WAIT_S = 60  # a client's patience: on a shared machine the server's thread waits for a core


@pytest.fixture(scope="module")
def server(broker, tiny_dgnet, tmp_path_factory):
    from worker.celery_app import make_app
    from worker.jobs import CeleryJobs, JobStore

    roots = tmp_path_factory.mktemp("schemathesis")
    for name in ("models", "data", "shards"):
        (roots / name).mkdir()
    # Small limits keep each generated request cheap (at most 8 images made), with room for the
    # default of interpolation steps (8).
    settings = Settings(api_key=API_KEY, models_root=roots / "models", data_root=roots / "data",
                        shards_root=roots / "shards", max_images=4, max_outputs=8, max_steps=8)
    engine = Engine.from_checkpoint(tiny_dgnet["dgnet"], "cpu")
    jobs = CeleryJobs(JobStore(broker["client"], broker["prefix"]), make_app())
    with Live(create_app(engine, settings, jobs=jobs), settings) as live:
        deadline = time.monotonic() + 120  # warmed up, so that a swap answers 200, not 503 not_ready
        while not httpx.get(f"{live.url}/v1/readyz").json()["ready"] and time.monotonic() < deadline:
            time.sleep(0.1)
        live.doc = httpx.get(f"{live.url}/openapi.json", headers=AUTH).json()
        yield live


def schema_of(doc: dict, name: str) -> jsonschema_rs.Validator:
    """A validator for one component of ``doc``, its references resolved within the document."""
    return jsonschema_rs.Draft202012Validator({"$ref": f"#/components/schemas/{name}",
                                               "components": doc["components"]})


# -- the probe's findings, as written in the issue -----------------------------------------------
def test_base64_image_fields_state_their_encoding_and_pattern(server):
    swap = schema_of(server.doc, "SwapRequest")
    assert not swap.is_valid({"appearance": ["0"], "structure": [EXAMPLE_PNG_BLUE]})
    assert swap.is_valid({"appearance": [EXAMPLE_PNG_RED], "structure": [f"data:image/png;base64,{EXAMPLE_PNG_BLUE}"]})
    image = server.doc["components"]["schemas"]["RenderRequest"]["properties"]["source"]
    assert image["contentEncoding"] == "base64" and image["pattern"]
    # What the pattern refuses, the server refuses too, as bad base64.
    r = httpx.post(f"{server.url}/v1/swap", headers=AUTH, json={"appearance": ["0"], "structure": [EXAMPLE_PNG_BLUE]},
                   timeout=WAIT_S)
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_base64", r.text


def test_a_job_spec_is_a_union_on_kind_with_each_kinds_rules(server):
    request = schema_of(server.doc, "JobRequest")
    spec = {"checkpoint": "g", "data": "market1501_mini"}
    assert not request.is_valid({"spec": {**spec, "kind": "crgan_render"}, "out": "o"})
    assert request.is_valid({"spec": {**spec, "kind": "crgan_render", "target": "cuhk03_mini"}, "out": "o"})
    assert not request.is_valid({"spec": {**spec, "kind": "dgnet_all_pairs", "target": "cuhk03_mini"}, "out": "o"})
    assert server.doc["components"]["schemas"]["JobRequest"]["properties"]["spec"]["discriminator"]["propertyName"] \
        == "kind"
    # The server holds a spec to the same rules: what the document refuses, it refuses (422).
    r = httpx.post(f"{server.url}/v1/jobs", headers=AUTH, json={"spec": {**spec, "kind": "crgan_render"}, "out": "o"},
                   timeout=WAIT_S)
    assert r.status_code == 422 and r.json()["error"]["message"] == "spec.target: Field required", r.text


def test_the_flat_job_spec_keeps_the_rules_of_its_kind():
    """Workers and `reidgen generate` read the flat `JobSpec`: the rules of each kind's spec hold for
    it too, and a spec read over HTTP is a `JobSpec` with the same JSON (so the same plan hash)."""
    from pydantic import ValidationError

    from api_schemas.jobs import JobRequest, JobSpec

    names = {"checkpoint": "g", "data": "market1501_mini"}
    with pytest.raises(ValidationError, match="target"):
        JobSpec(kind="crgan_render", **names)
    with pytest.raises(ValidationError, match="only used by crgan_render"):
        JobSpec(kind="dgnet_random_structures", target="cuhk03_mini", **names)
    flat = JobSpec(kind="crgan_render", target="cuhk03_mini", **names)
    sent = JobRequest.model_validate({"spec": {"kind": "crgan_render", "target": "cuhk03_mini", **names}, "out": "o"})
    assert isinstance(sent.spec, JobSpec) and sent.spec.model_dump_json() == flat.model_dump_json()


def test_x_timeout_ms_has_the_bounds_the_server_takes(server):
    (param,) = [p for p in server.doc["paths"]["/v1/swap"]["post"]["parameters"] if p["name"] == "X-Timeout-Ms"]
    bounds = param["schema"]
    assert bounds["type"] == "integer" and "anyOf" not in bounds  # no null: a header has no null
    body = {"appearance": [EXAMPLE_PNG_RED], "structure": [EXAMPLE_PNG_BLUE]}
    for value, ok in ((bounds["minimum"] - 1, False), (bounds["maximum"], True), (bounds["maximum"] + 1, False)):
        r = httpx.post(f"{server.url}/v1/swap", headers={**AUTH, "X-Timeout-Ms": str(value)}, json=body,
                       timeout=WAIT_S)
        assert (r.status_code == 200) is ok and (r.status_code == 422) is not ok, (value, r.status_code, r.text)


def test_options_on_a_job_lists_every_method_of_its_path(server):
    r = httpx.options(f"{server.url}/v1/jobs/{JOB_ID}", headers=AUTH)
    assert r.status_code == 405, r.text
    assert {m.strip() for m in r.headers["allow"].split(",")} >= {"GET", "DELETE"}


def test_a_one_millisecond_deadline_is_a_listed_504(server):
    r = httpx.post(f"{server.url}/v1/swap", headers={**AUTH, "X-Timeout-Ms": "1"},
                   json={"appearance": [EXAMPLE_PNG_RED] * 3, "structure": [EXAMPLE_PNG_BLUE], "mode": "grid"},
                   timeout=WAIT_S)
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded", r.text
    assert "504" in server.doc["paths"]["/v1/swap"]["post"]["responses"]


# -- the whole document, with every check --------------------------------------------------------
def test_schemathesis_finds_no_failure_with_every_check(server):
    import schemathesis
    from schemathesis.config import SchemathesisConfig
    from schemathesis.engine import Status, events, from_schema

    # Positive data a server may still refuse for what no JSON Schema can hold: the bytes of an
    # image that is not a picture (400), counts across fields (413: appearance + structure images,
    # a grid's outputs; 422: mode 'pairs' with lists of different lengths), a job's names that the
    # server does not have and bounds that depend on its data (400). Each is listed per route.
    beyond_schema = {"/v1/swap": ["400", "413", "422"], "/v1/interpolate": ["400"], "/v1/render": ["400"],
                     "/v1/jobs": ["400"]}
    accepted = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]
    # Data the document refuses is refused; a list or a number over this server's limit with 413,
    # the status the document gives it (Schemathesis expects 4xx codes other than 413 by default).
    refused = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]
    # Answers in the 5xx range that are no fault, each listed with its route: the client's own
    # deadline passed (504, e.g. X-Timeout-Ms: 1), the queue is full or the model not warm yet (503).
    no_fault = {"/v1/swap": ["503", "504"], "/v1/interpolate": ["503", "504"], "/v1/render": ["503", "504"],
                "/v1/readyz": ["503"]}
    operations = [{"include-path": path, "checks": {
        "positive_data_acceptance": {"expected-statuses": [*accepted, *beyond_schema.get(path, [])]},
        "not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", *no_fault.get(path, [])]}}}
        for path in sorted({*beyond_schema, *no_fault})]
    config = SchemathesisConfig.from_dict({
        "seed": 23, "headers": AUTH, "request-timeout": WAIT_S,
        "checks": {"enabled": True, "negative_data_rejection": {"expected-statuses": refused}},
        "generation": {"max-examples": 12, "database": "none"},
        "operations": operations,
    })
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", config=config, headers=AUTH)
    failures, started = [], time.monotonic()
    for event in from_schema(schema).execute():
        if isinstance(event, events.NonFatalError | events.FatalError):
            failures.append(f"error: {event}")
        recorder = getattr(event, "recorder", None)
        if recorder is None or getattr(event, "status", None) not in (Status.FAILURE, Status.ERROR):
            continue
        for case_id, checks in recorder.checks.items():
            for check in checks:
                if check.failure_info is not None:
                    failures.append(describe(recorder, case_id, check))
    print(f"schemathesis: {time.monotonic() - started:.1f} s")
    assert not failures, f"{len(failures)} failures:\n\n" + "\n\n".join(dict.fromkeys(failures))


def describe(recorder, case_id: str, check) -> str:
    """One failure: the check, the request that got it and the answer."""
    failure = check.failure_info.failure
    interaction = recorder.interactions.get(case_id)
    request = response = ""
    if interaction is not None:
        request = f"{interaction.request.method} {interaction.request.uri} {(interaction.request.body or b'')[:300]!r}"
        if interaction.response is not None:
            response = f"{interaction.response.status_code} {interaction.response.content[:300]!r}"
    return f"{recorder.label} {check.name}: {failure.title}\n{failure.message}\n  sent: {request}\n  got: {response}"
