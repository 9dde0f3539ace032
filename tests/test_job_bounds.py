"""What one job may cost a worker (issue 23, item 3): bounded shard and batch sizes, checked at
submission and again by the worker, and a cancelled shard stops at its next batch.

The submission checks go through the real app with the Celery jobs backend on a real Redis (no
worker: nothing here is queued); the cancellation runs the worker's own `generate_shard` on a real
tiny DG-Net.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from api_schemas.jobs import JobSpec
from reidgen.core.checkpoint import save_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def http(broker, tmp_path, market_mini):
    from fastapi.testclient import TestClient

    from generator_service.http import Settings, create_app
    from generator_service.inference.engine import Engine, ServedModel
    from worker.celery_app import make_app
    from worker.jobs import CeleryJobs, JobStore

    stand_in = ServedModel(name="stand-in", kind="dgnet", checkpoint="stand-in.pt", identity="0", step=None,
                           preset=None, image_size=(128, 64), net=None)
    save_checkpoint(tmp_path / "dgnet.pt", "dgnet", {})  # its header only: no worker loads it here
    settings = Settings(models_root=tmp_path, data_root=market_mini.parent, shards_root=tmp_path)
    app = create_app(Engine([stand_in], "cpu"), settings,
                     jobs=CeleryJobs(JobStore(broker["client"], broker["prefix"]), make_app()))
    return TestClient(app, raise_server_exceptions=False)


def body(**spec) -> dict:
    base = {"kind": "dgnet_random_structures", "checkpoint": "dgnet", "data": "market1501_mini",
            "structures_per_image": 1}
    return {"spec": {**base, **spec}, "out": "bounded"}


def test_the_probes_job_is_refused_before_anything_is_written(http, tmp_path, broker):
    """The probe's spec: a million records a shard in device batches of 4096 (the pool process grew
    from 1.3 to 6.9 GB). Refused by the schema, and below the schema's bounds by the server's."""
    keys = set(broker["client"].scan_iter(f"{broker['prefix']}*"))
    answer = http.post("/v1/jobs", json=body(shard_size=1_000_000, batch_size=4096))
    assert answer.status_code == 422 and "shard_size" in answer.text and "batch_size" in answer.text, answer.text
    answer = http.post("/v1/jobs", json=body(shard_size=20_000))
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "shard_too_large", answer.text
    assert answer.json()["error"]["message"].startswith("spec.shard_size: 20000 is above this server's maximum of")
    answer = http.post("/v1/jobs", json=body(batch_size=512))
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "batch_too_large", answer.text
    assert not (tmp_path / "bounded").exists()
    assert set(broker["client"].scan_iter(f"{broker['prefix']}*")) == keys


def test_a_worker_refuses_a_task_whose_spec_is_past_its_bounds(broker, monkeypatch, tmp_path, market_mini):
    """A task sent past the API (``reidgen generate --submit``, or straight into Redis) meets the same
    bounds on the worker: the job fails with the client's error, and no shard is made."""
    import worker.tasks as tasks
    from api_schemas.jobs import JobRequest
    from worker.celery_app import make_app
    from worker.jobs import JobStore, submit_job

    for var, root in (("REIDGEN_MODELS_ROOT", tmp_path), ("REIDGEN_DATA", market_mini.parent),
                      ("REIDGEN_SHARDS_ROOT", tmp_path)):
        monkeypatch.setenv(var, str(root))
    store = JobStore(broker["client"], broker["prefix"])
    monkeypatch.setattr(tasks, "_store", store)
    spec = JobSpec(kind="dgnet_random_structures", checkpoint="dgnet", data=str(market_mini), subset=4,
                   structures_per_image=1, shard_size=64, batch_size=1024)
    job = submit_job(JobRequest(spec=spec, out=str(tmp_path / "big")), store, make_app())  # unbounded: the CLI's way
    result = tasks.generate_shard_task(job, spec.model_dump_json(), str(tmp_path / "big"), 0)
    assert result["status"] == "failed"
    [error] = store.status(job).error_details
    assert error.code == "batch_too_large" and error.message.startswith("spec.batch_size: 1024 is above")
    assert not list((tmp_path / "big").glob("*shard-*"))


def test_a_cancelled_shard_stops_at_its_next_batch(tiny_dgnet, tmp_path):
    from worker.run import Cancelled, generate_shard

    spec = JobSpec(kind="dgnet_random_structures", checkpoint=str(tiny_dgnet["dgnet"]), data=str(tiny_dgnet["data"]),
                   subset=12, structures_per_image=1, shard_size=12, batch_size=2, soft_labels=False)
    asked, progress = [], []

    def should_stop() -> bool:  # the job is cancelled while its second batch runs
        asked.append(len(progress))
        return len(asked) > 2

    with pytest.raises(Cancelled):
        generate_shard(spec, 0, tmp_path / "out", device="cpu", should_stop=should_stop, on_records=progress.append)
    assert len(asked) == 3 and sum(progress) <= 2 * 2  # asked before each batch; stopped before the third
    assert sorted(p.name for p in Path(tmp_path / "out").iterdir()) == ["job.json"]  # the partial shard is gone
