"""Issue 23, item 6 ("smaller ones") and item 4: what a hostile client or a crafted file still broke.

- A job naming no model (``nope``, ``dgnet/config.json``) is refused when submitted (400 naming
  the field), not taken to hold an active-job slot until a worker fails it.
- An ``out`` inside another job's folder (``ok1/shard-00000``) is refused.
- One crafted ``.pt`` in the models folder no longer stops the server: the others are served, the
  refused one is listed (with a reason, no server path) and reported not ready.
- The advice to ``convert-checkpoint --trust`` is given only for an older reidgen's checkpoint,
  never for a hostile pickle that holds the words ``format``, ``kind`` and ``reidgen``.
- A request body's deadline is the configured one (``body_timeout_s``), counted from the head.

The jobs tests use the real app with the Celery jobs backend on a real Redis (conftest's
``broker``); no worker runs, so the models there are checkpoint headers only.
"""
from __future__ import annotations

import base64
import io
import logging
import pathlib
import re
import shutil
import socket
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from api_schemas.service import ErrorBody
from reidgen.cli import main
from reidgen.core.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from reidgen.core.errors import ReidgenError
from tests import error_bodies

REFUSAL = "holds objects other than tensors and plain data"


# -- a job's names, checked at submission ----------------------------------------------------------
@pytest.fixture
def roots(tmp_path, market_mini) -> dict[str, pathlib.Path]:
    """A models root with a DG-Net run folder (and its config.json), a re-id and a CR-GAN
    checkpoint and a junk file; a shards root; the data root holding market1501_mini."""
    models, shards = tmp_path / "models", tmp_path / "shards"
    save_checkpoint(models / "dgnet" / "checkpoints" / "last.pt", "dgnet", {})
    (models / "dgnet" / "config.json").write_text('{"kind": "dgnet", "format": "reidgen"}')
    save_checkpoint(models / "reid.pt", "reid", {})
    save_checkpoint(models / "crgan.pt", "crgan", {})
    (models / "junk.pt").write_bytes(b"what the server keeps here")
    shards.mkdir()
    return {"models": models, "shards": shards, "data": market_mini.parent}


@pytest.fixture
def http(broker, roots):
    from generator_service.http import Settings, create_app
    from generator_service.inference.engine import Engine, ServedModel
    from worker.celery_app import make_app
    from worker.jobs import CeleryJobs, JobStore

    stand_in = ServedModel(name="stand-in", kind="dgnet", checkpoint="stand-in.pt", identity="0", step=None,
                           preset=None, image_size=(128, 64), net=None)
    settings = Settings(models_root=roots["models"], data_root=roots["data"], shards_root=roots["shards"])
    jobs = CeleryJobs(JobStore(broker["client"], broker["prefix"]), make_app())
    client = TestClient(create_app(Engine([stand_in], "cpu"), settings, jobs=jobs), raise_server_exceptions=False)
    yield client
    for job_id in jobs.store.active_jobs():  # the slots of the jobs taken here
        jobs.store.cancel(job_id)


def job(out: str = "out", **spec) -> dict:
    base = {"kind": "dgnet_random_structures", "checkpoint": "dgnet", "data": "market1501_mini", "subset": 4,
            "structures_per_image": 1, "shard_size": 64, "soft_labels": False}
    return {"spec": {**base, **spec}, "out": out}


def refused(response, code: str) -> str:
    """The message of a 400 with ``code``, checked to hold no server path."""
    assert response.status_code == 400, response.text
    body = ErrorBody.model_validate(response.json())
    assert body.error.code == code, body
    assert error_bodies.leaks(error_bodies.RECORDED[-1:]) == []
    return body.error.message


def taken(broker) -> set[bytes]:
    return set(broker["client"].scan_iter(f"{broker['prefix']}*"))


@pytest.mark.parametrize("name", ["nope", "dgnet/config.json", "junk.pt", "reid.pt", "reid"])
def test_a_job_naming_no_dgnet_checkpoint_is_refused_when_submitted(http, broker, roots, name):
    """Missing, not a checkpoint, or of another kind: the same 400, before anything is written."""
    before = taken(broker)
    message = refused(http.post("/v1/jobs", json=job(checkpoint=name)), "bad_checkpoint")
    assert message == (f"spec.checkpoint: no reidgen DG-Net checkpoint named {name!r} on this server (a "
                       f"dgnet_random_structures job needs one); give the name of a DG-Net checkpoint under its "
                       f"models root: NAME, NAME.pt or a run folder NAME")
    assert taken(broker) == before and not (roots["shards"] / "out").exists()


def test_a_teacher_that_is_no_reid_checkpoint_is_refused_when_submitted(http):
    message = refused(http.post("/v1/jobs", json=job(teacher="dgnet", soft_labels=True)), "bad_teacher")
    assert message.startswith("spec.teacher: no reidgen re-id checkpoint named 'dgnet' on this server")


@pytest.mark.parametrize("spec, code, words", [
    ({"data": "nope"}, "unknown_data", "data: data set 'nope' not found"),
    ({"kind": "crgan_render", "target": "market1501_mini"}, "bad_checkpoint",
     "spec.checkpoint: no reidgen CR-GAN checkpoint named 'dgnet'"),
    ({"kind": "crgan_render", "checkpoint": "crgan", "target": "nope"}, "unknown_data",
     "target: data set 'nope' not found"),
    ({"checkpoint": "../models/dgnet"}, "path_not_allowed", "spec.checkpoint: '../models/dgnet' contains '..'"),
])
def test_the_other_names_are_checked_when_submitted(http, spec, code, words):
    assert refused(http.post("/v1/jobs", json=job(**spec)), code).startswith(words)


def test_the_names_of_real_models_are_taken(http, roots):
    """The control: a run folder's name, with a re-id teacher."""
    answer = http.post("/v1/jobs", json=job(teacher="reid", soft_labels=True))
    assert answer.status_code == 202, answer.text
    assert (roots["shards"] / "out" / "job.json").is_file()


# -- out inside another job's folder --------------------------------------------------------------
@pytest.mark.parametrize("inside", ["ok1/shard-00000", "ok1/new/deeper"])
def test_an_out_inside_another_jobs_folder_is_refused(http, broker, roots, inside):
    assert http.post("/v1/jobs", json=job(out="ok1")).status_code == 202
    (roots["shards"] / "ok1" / "shard-00000").mkdir()  # what a finished shard's folder is
    before = taken(broker)
    for out in (inside, str(roots["shards"] / inside)):
        message = refused(http.post("/v1/jobs", json=job(out=out, seed=1)), "bad_request")
        assert message.startswith(f"out: cannot use {out!r} as the output folder: it lies inside the folder of "
                                  f"another job ('ok1' holds a job.json)"), message
    assert sorted(p.name for p in (roots["shards"] / "ok1").iterdir()) == ["job.json", "shard-00000"]
    assert not (roots["shards"] / "ok1" / "shard-00000" / "job.json").exists()
    assert taken(broker) == before


# -- serve with one crafted file in the models folder ----------------------------------------------
class Payload:
    """Unpickling this calls ``Path(marker).write_text("pwned")``: proof that code ran."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path(self.marker).write_text, ("pwned",)


def hostile(path: pathlib.Path, kind: str = "dgnet") -> pathlib.Path:
    """A file with reidgen's header whose model runs code when unpickled; returns the marker."""
    marker = path.with_name(path.stem + ".marker")
    torch.save({"format": "reidgen", "version": 1, "kind": kind, "model": Payload(marker)}, path)
    return marker


def png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 128), (90, 120, 150)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_one_crafted_model_is_refused_alone(tiny_dgnet, tmp_path, caplog):
    from generator_service.http.serve import build_app

    models = tmp_path / "models"
    models.mkdir()
    shutil.copyfile(resolve_checkpoint(tiny_dgnet["dgnet"]), models / "good.pt")
    marker = hostile(models / "evil.pt")
    with caplog.at_level(logging.WARNING, logger="reidgen.engine"):
        app = build_app(models, device="cpu")
    assert any("refused model 'evil'" in r.getMessage() and REFUSAL in r.getMessage() for r in caplog.records)
    with TestClient(app) as client:
        listed = client.get("/v1/models").json()
        assert [m["name"] for m in listed["models"]] == ["good"]
        [evil] = listed["refused"]
        assert evil["name"] == "evil" and evil["checkpoint"] == "evil.pt"
        assert evil["reason"].startswith(f"checkpoint evil.pt {REFUSAL}") and str(tmp_path) not in evil["reason"]
        deadline = time.monotonic() + 30
        while (ready := client.get("/v1/readyz")).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.status_code == 200 and ready.json()["refused"] == ["evil"]  # ready for the others
        answer = client.post("/v1/swap", json={"model": "evil", "appearance": [png()], "structure": [png()]})
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "not_ready", answer.text
        assert "refused when the server started" in answer.text and str(tmp_path) not in answer.text
        assert client.post("/v1/swap", json={"model": "good", "appearance": [png()],
                                             "structure": [png()]}).status_code == 200
    assert not marker.exists()
    (models / "good.pt").unlink()  # every file refused: the start fails, saying why
    start_failure = re.escape(f"no model of {models} could be loaded: evil.pt: ") + ".*" + REFUSAL
    with pytest.raises(ReidgenError, match=start_failure):
        build_app(models, device="cpu")


# -- the convert hint -------------------------------------------------------------------------------
def older(path: pathlib.Path) -> pathlib.Path:
    """What an older reidgen wrote: its header, then numpy values beside the tensors."""
    torch.save({"format": "reidgen", "version": 1, "kind": "reid", "models": {"model": {"w": torch.zeros(2)}},
                "step": np.int64(3), "rng": {"numpy": np.zeros(3)}}, path)
    return path


def test_the_convert_hint_is_only_for_an_older_reidgens_checkpoint(tmp_path, capsys):
    def message(path: pathlib.Path) -> str:
        with pytest.raises(ReidgenError, match=REFUSAL) as info:
            load_checkpoint(path, "reid")
        return str(info.value)

    assert f"reidgen convert-checkpoint {older(tmp_path / 'old.pt')} NEW.pt --trust" in message(tmp_path / "old.pt")
    crafted = tmp_path / "crafted.pt"
    marker = hostile(crafted, "reid")  # reidgen's very header: format, version, kind
    torch.save({"note": "format kind reidgen", "model": Payload(marker)}, tmp_path / "words.pt")
    old = torch.load(tmp_path / "old.pt", weights_only=False)
    torch.save({**old, "extra": Payload(marker)}, tmp_path / "old-and-evil.pt")  # numpy, and a payload
    for path in (crafted, tmp_path / "words.pt", tmp_path / "old-and-evil.pt"):
        assert "convert-checkpoint" not in message(path)
        assert main(["convert-checkpoint", str(path), str(tmp_path / "new.pt"), "--trust"]) == 2  # not unpickled
        assert "is not a checkpoint of an older reidgen" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "new.pt").exists()
    with pytest.raises(SystemExit):
        main(["convert-checkpoint", "--trust", "--help"])
    assert "this runs any code in the file" in " ".join(capsys.readouterr().out.split())


# -- the body's deadline (item 4) --------------------------------------------------------------------
def answer_time(port: int, head: bytes, trickle: bool) -> tuple[float, bytes]:
    """Send ``head``, then (``trickle``) one body byte every 0.1 s; seconds from the head to the
    answer, and the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sent = time.monotonic()  # before the head leaves: the server's clock cannot start earlier
        sock.sendall(head)
        sock.settimeout(0.1)
        got = b""
        while time.monotonic() - sent < 8:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                if trickle:
                    try:
                        sock.sendall(b" ")
                    except OSError:  # closed after its answer: read what came
                        trickle = False
                continue
            if not chunk:
                break
            got += chunk
            if b"\r\n\r\n" in got and got.rstrip().endswith(b"}"):
                return time.monotonic() - sent, got
        return time.monotonic() - sent, got


def test_the_body_deadline_is_the_configured_one():
    from generator_service.http import Settings, create_app
    from generator_service.inference.engine import Engine, ServedModel
    from tests.live import Live

    stand_in = ServedModel(name="stand-in", kind="dgnet", checkpoint="stand-in.pt", identity="0", step=None,
                           preset=None, image_size=(128, 64), net=None)
    engine = Engine([stand_in], "cpu")
    engine.warmed = True  # no warm-up: no request here gets as far as the model
    settings = Settings(header_timeout_s=10, body_timeout_s=2)
    head = (b"POST /v1/swap HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n")
    with Live(create_app(engine, settings), settings) as live:
        for trickle in (False, True):
            seconds, answer = answer_time(live.port, head, trickle)
            assert answer.startswith(b"HTTP/1.1 408") and b'"body_timeout"' in answer, (trickle, answer[:300])
            assert 2.0 <= seconds < 3.0, (trickle, seconds)
