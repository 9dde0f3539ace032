"""The generator service end to end: a real uvicorn server on a loopback port, serving real
checkpoints from tiny training runs on real images (DG-Net on market1501_mini, CR-GAN from
market1501_mini into cuhk03_mini). Every endpoint, the errors, auth, the limits, backpressure,
deadlines, the engine's batching/out-of-memory/failure isolation, and an OpenAPI-driven fuzz."""
from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image

from api_schemas.service import (
    ErrorBody,
    InterpolateResponse,
    ModelsResponse,
    RenderResponse,
    SwapResponse,
)
from generator_service.http import Settings, create_app
from generator_service.http.client import ServiceClient, ServiceError, decode_b64
from generator_service.http.serve import serve
from generator_service.inference.engine import DeadlineExceeded, Engine
from generator_service.inference.kinds import SwapItem
from generator_service.models.crgan_nets import CRGAN_PRESETS
from reidgen.core.images import decode_image_bytes, to_pil
from reidgen.core.market import link_subset
from trainer.tasks.crgan import crgan_preset_config, train_crgan
from trainer.tasks.dgnet import dgnet_preset_config, train_dgnet
from trainer.tasks.reid import preset_config, train_reid

REPO = Path(__file__).resolve().parents[1]
LIMITS = {"max_images": 6, "max_outputs": 8, "max_pixels": 200 * 200, "max_body_bytes": 256 * 1024, "max_steps": 8}


# -- fixtures: real checkpoints, a live server ---------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(market_mini, cuhk_mini, tmp_path_factory):
    """A models directory with a DG-Net and a CR-GAN run (a few iterations each: the service
    needs real checkpoints, not good ones), a DG-Net file link and a re-id teacher (skipped)."""
    root = tmp_path_factory.mktemp("service")
    src = link_subset(market_mini, root / "src", ids=4)
    tgt = link_subset(cuhk_mini, root / "tgt", ids=4)
    teacher = train_reid(preset_config("tiny", data=str(src), epochs=1, workers=0, evaluate=False),
                         root / "teacher", progress=False)
    models = root / "models"
    train_dgnet(dgnet_preset_config("small", data=str(src), teacher=str(teacher), backbone="small_cnn",
                                    pretrained="none", workers=0, batch_size=4, grid_every=0, amp=False,
                                    iterations=2, checkpoint_every=10_000), models / "dgnet-tiny", progress=False)
    crgan = replace(CRGAN_PRESETS["small"], base_channels=12, dis_channels=16, cam_channels=(8, 16, 32, 32))
    train_crgan(crgan_preset_config("small", source=str(src), target=str(tgt), id_model=str(teacher), model=crgan,
                                    masks="pose", batch_size=4, cam_epochs=1, workers=0, grid_every=0, amp=False,
                                    iterations=2, checkpoint_every=10_000), models / "crgan-tiny", progress=False)
    (models / "teacher.pt").symlink_to(teacher)
    (models / "dgnet-file.pt").symlink_to(models / "dgnet-tiny" / "checkpoints" / "last.pt")
    people = sorted((src / "bounding_box_train").iterdir())
    contexts = sorted((tgt / "bounding_box_train").iterdir())
    return {"models": models, "people": [p.read_bytes() for p in people[::10][:4]],
            "contexts": [p.read_bytes() for p in contexts[:2]]}


def wait_for(predicate, timeout: float, what: str) -> None:
    """Poll ``predicate`` until true, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class LiveServer:
    """uvicorn serving an app in a background thread, on a socket bound to a free loopback port."""

    def __init__(self, app):
        self.app, self.engine = app, app.state.engine
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        wait_for(lambda: httpx.get(f"{self.url}/v1/healthz").status_code == 200, 30, "healthz")
        wait_for(lambda: httpx.get(f"{self.url}/v1/readyz").status_code == 200, 60, "readyz")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


@pytest.fixture(scope="module")
def server(trained):
    engine = Engine.from_models_dir(trained["models"], "cpu", max_batch=8, max_wait_ms=20, queue_size=32)
    with LiveServer(create_app(engine, Settings(**LIMITS))) as live:
        yield live


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_bytes(size: tuple[int, int], colour=(90, 120, 150)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def error_of(response: httpx.Response, status: int, code: str) -> str:
    """Assert an ErrorBody with this status and code (and no traceback); return the message."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json")
    assert "Traceback" not in response.text and 'File "' not in response.text
    body = ErrorBody.model_validate_json(response.content)
    assert body.error.code == code, body
    return body.error.message


# -- the endpoints -------------------------------------------------------------------------------
def test_models_health_and_readiness(server):
    assert httpx.get(f"{server.url}/v1/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/v1/readyz").json()["ready"] is True
    info = ModelsResponse.model_validate(httpx.get(f"{server.url}/v1/models").json())
    by_name = {m.name: m for m in info.models}
    assert set(by_name) == {"dgnet-tiny", "dgnet-file", "crgan-tiny"}  # the re-id teacher is skipped
    assert by_name["dgnet-tiny"].identity == by_name["dgnet-file"].identity  # same file, same identity
    assert by_name["dgnet-tiny"].checkpoint == "dgnet-tiny/checkpoints/last.pt" and by_name["dgnet-tiny"].step == 2
    assert by_name["crgan-tiny"].kind == "crgan" and by_name["crgan-tiny"].masks == "pose"
    assert by_name["dgnet-tiny"].preset == "small" and by_name["dgnet-tiny"].image_size == [128, 64]
    assert sum(m.default for m in info.models if m.kind == "dgnet") == 1
    assert info.presets["dgnet"] == ["fast", "paper", "small"] and info.engine.device == "cpu"
    assert info.limits.max_images == 6 and info.limits.auth is False
    with ServiceClient(server.url) as client:
        assert client.wait_ready(timeout=5).ready is True
    with ServiceClient(f"http://127.0.0.1:{free_port()}") as client, \
            pytest.raises(TimeoutError, match="not ready after 0.3 s .last: ConnectError"):
        client.wait_ready(timeout=0.3)  # nothing listens there


def test_swap_json_pairs_grid_and_png(server, trained):
    a, s = trained["people"][:2], trained["people"][2:4]
    r = httpx.post(f"{server.url}/v1/swap", json={"model": "dgnet-tiny", "appearance": [b64(x) for x in a],
                                                  "structure": [b64(x) for x in s]})
    pairs = SwapResponse.model_validate(r.json())
    assert (pairs.rows, pairs.columns, pairs.width, pairs.height) == (1, 2, 64, 128)
    assert [(g.appearance, g.structure) for g in pairs.images] == [(0, 0), (1, 1)]
    assert decode_b64(pairs.images[0].image).size == (64, 128)

    grid = httpx.post(f"{server.url}/v1/swap", json={"appearance": [b64(x) for x in a], "structure":
                                                     [b64(x) for x in trained["people"][1:4]], "mode": "grid"}).json()
    assert (grid["rows"], grid["columns"], len(grid["images"])) == (2, 3, 6)
    assert [(g["appearance"], g["structure"]) for g in grid["images"]][:4] == [(0, 0), (0, 1), (0, 2), (1, 0)]

    r = httpx.post(f"{server.url}/v1/swap", json={"appearance": [b64(x) for x in a], "structure": [b64(s[0])],
                                                  "mode": "grid", "format": "png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert (r.headers["x-reidgen-rows"], r.headers["x-reidgen-columns"]) == ("2", "1")
    with Image.open(io.BytesIO(r.content)) as im:
        assert im.size == (64, 2 * 128)
    r = httpx.post(f"{server.url}/v1/swap", json={"appearance": [b64(a[0])], "structure": [b64(s[0])],
                                                  "format": "jpeg"})
    assert r.headers["content-type"] == "image/jpeg" and r.content[:2] == b"\xff\xd8"


def test_http_and_in_process_engine_agree(server, trained):
    """One code path: the HTTP result is the engine's synchronous result, encoded."""
    a, s = trained["people"][0], trained["people"][3]
    got = httpx.post(f"{server.url}/v1/swap", json={"appearance": [b64(a)], "structure": [b64(s)]}).json()
    model = server.engine.model_for("swap")
    x = torch.stack([model.image_tensor(decode_image_bytes(a))])
    y = torch.stack([model.image_tensor(decode_image_bytes(s))])
    expected = np.asarray(to_pil(server.engine.swap_batch(x, y)[0]), dtype=np.int16)
    actual = np.asarray(decode_b64(got["images"][0]["image"]), dtype=np.int16)
    assert np.abs(expected - actual).max() <= 1


def test_swap_multipart(server, trained):
    files = [("appearance", ("a.jpg", trained["people"][0], "image/jpeg")),
             ("appearance", ("b.jpg", trained["people"][1], "image/jpeg")),
             ("structure", ("c.jpg", trained["people"][2], "image/jpeg"))]
    r = httpx.post(f"{server.url}/v1/swap", files=files, data={"mode": "grid", "model": "dgnet-file"})
    body = SwapResponse.model_validate(r.json())
    assert body.model == "dgnet-file" and (body.rows, body.columns) == (2, 1)
    r = httpx.post(f"{server.url}/v1/swap", files=files[:1] + files[2:], data={"format": "png"})
    assert r.headers["content-type"] == "image/png"
    msg = error_of(httpx.post(f"{server.url}/v1/swap", files=files, data={"colour": "red"}), 422, "invalid_request")
    assert "colour" in msg
    msg = error_of(httpx.post(f"{server.url}/v1/swap", files=[("appearance", ("x.png", b"garbage", "image/png")),
                                                              files[2]]), 400, "unreadable_image")
    assert msg.startswith("appearance[0]")
    assert "structure" in error_of(httpx.post(f"{server.url}/v1/swap", files=files[:1]), 422, "invalid_request")


def test_render_and_interpolate(server, trained):
    person, context = trained["people"][0], trained["contexts"][0]
    r = httpx.post(f"{server.url}/v1/render", json={"source": b64(person), "target": b64(context)})
    body = RenderResponse.model_validate(r.json())
    assert body.model == "crgan-tiny" and body.target_mask == "pose"
    assert decode_b64(body.image).size == (64, 128) and decode_b64(body.context_mask).mode == "L"
    mask = png_bytes((32, 64), (255, 255, 255))
    r = httpx.post(f"{server.url}/v1/render", json={"source": b64(person), "target": b64(context),
                                                    "target_mask": b64(mask)})
    assert r.json()["target_mask"] == "client"
    r = httpx.post(f"{server.url}/v1/render", json={"source": b64(person), "target": b64(context), "format": "png"})
    assert r.headers["content-type"] == "image/png"
    assert "CR-GAN" in error_of(httpx.post(f"{server.url}/v1/render", json={
        "source": b64(person), "target": b64(context), "model": "dgnet-tiny"}), 422, "wrong_model_kind")

    r = httpx.post(f"{server.url}/v1/interpolate", json={"first": b64(person), "second": b64(context), "steps": 5,
                                                         "what": "structure"})
    inter = InterpolateResponse.model_validate(r.json())
    assert len(inter.images) == 5 and inter.what == "structure"
    r = httpx.post(f"{server.url}/v1/interpolate", json={"first": b64(person), "second": b64(context), "steps": 3,
                                                         "format": "png"})
    with Image.open(io.BytesIO(r.content)) as im:
        assert im.size == (3 * 64, 128)
    assert "at most 8" in error_of(httpx.post(f"{server.url}/v1/interpolate", json={
        "first": b64(person), "second": b64(person), "steps": 9}), 413, "too_many_outputs")


def test_python_client(server, trained):
    with ServiceClient(server.url) as client:
        assert client.health().status == "ok" and client.ready().ready
        assert {m.name for m in client.models().models} >= {"dgnet-tiny", "crgan-tiny"}
        a, s = trained["people"][:2], trained["people"][2:3]
        assert len(client.swap(a, s).images) == 2
        assert client.swap(a, s, mode="grid", multipart=True).rows == 2
        assert client.swap_image([Image.open(io.BytesIO(a[0]))], s, format="jpeg").size == (64, 128)
        assert client.render(a[0], trained["contexts"][1]).width == 64
        assert len(client.interpolate(a[0], a[1], steps=3).images) == 3
        with pytest.raises(ServiceError) as err:
            client.swap(a, s, model="nope")
        assert err.value.status == 404 and err.value.code == "unknown_model" and "dgnet-tiny" in err.value.message


# -- errors and limits ---------------------------------------------------------------------------
def test_bad_input_errors_say_what_was_wrong(server, trained):
    url, ok = f"{server.url}/v1/swap", b64(trained["people"][0])
    assert "appearance[1]" in error_of(httpx.post(url, json={"appearance": [ok, "not base64!"], "structure": [ok]}),
                                       400, "bad_base64")
    assert "structure[0]" in error_of(httpx.post(url, json={"appearance": [ok], "structure": [b64(b"hello")]}),
                                      400, "unreadable_image")
    truncated = trained["people"][0][: len(trained["people"][0]) // 2]
    assert "truncated" in error_of(httpx.post(url, json={"appearance": [ok], "structure": [b64(truncated)]}),
                                   400, "unreadable_image")
    assert "data:image/png;base64" in error_of(httpx.post(url, json={"appearance": ["data:image/png,abc"],
                                                                     "structure": [ok]}), 400, "bad_base64")
    data_url = httpx.post(url, json={"appearance": [f"data:image/jpeg;base64,{ok}"], "structure": [ok]})
    assert data_url.status_code == 200
    assert "multipart/form-data" in error_of(httpx.post(url, content=b"x", headers={"content-type": "text/plain"}),
                                             415, "unsupported_media_type")
    error_of(httpx.post(url, content=b"{oops", headers={"content-type": "application/json"}), 422, "invalid_request")
    assert "colour" in error_of(httpx.post(url, json={"appearance": [ok], "structure": [ok], "colour": 1}),
                                422, "invalid_request")
    assert "mode 'grid'" in error_of(httpx.post(url, json={"appearance": [ok] * 2, "structure": [ok] * 3}),
                                     422, "invalid_request")
    assert "dgnet-tiny" in error_of(httpx.post(url, json={"appearance": [ok], "structure": [ok], "model": "x"}),
                                    404, "unknown_model")
    error_of(httpx.post(url, json={"appearance": [ok], "structure": [ok]}, headers={"X-Timeout-Ms": "soon"}),
             422, "invalid_request")
    error_of(httpx.get(f"{server.url}/v1/nowhere"), 404, "not_found")
    error_of(httpx.get(url), 405, "method_not_allowed")


def test_limits(server, trained):
    url, ok = f"{server.url}/v1/swap", b64(trained["people"][0])
    assert "at most 6" in error_of(httpx.post(url, json={"appearance": [ok] * 4, "structure": [ok] * 3,
                                                         "mode": "grid"}), 413, "too_many_images")
    assert "at most 8" in error_of(httpx.post(url, json={"appearance": [ok] * 3, "structure": [ok] * 3,
                                                         "mode": "grid"}), 413, "too_many_outputs")
    r = httpx.post(url, json={"appearance": [ok] * 4, "structure": [ok] * 2, "mode": "grid"})
    assert len(r.json()["images"]) == 8
    big = b64(png_bytes((300, 300)))
    assert "90000 pixels" in error_of(httpx.post(url, json={"appearance": [ok], "structure": [big]}),
                                      413, "image_too_large")
    huge = {"appearance": [ok], "structure": ["A" * (300 * 1024)]}
    assert "at most 262144" in error_of(httpx.post(url, json=huge), 413, "body_too_large")

    def chunks():  # no Content-Length: the limit is enforced on the bytes as they stream in
        yield b'{"appearance": ["'
        for _ in range(6):
            yield b"A" * 64 * 1024
    error_of(httpx.post(url, content=chunks(), headers={"content-type": "application/json"}), 413, "body_too_large")
    files = [("appearance", (f"{i}.jpg", trained["people"][0], "image/jpeg")) for i in range(7)]
    files.append(("structure", ("s.jpg", trained["people"][1], "image/jpeg")))
    error_of(httpx.post(url, files=files), 400, "bad_request")  # more files than the form parser takes at all


def test_metrics(server, trained):
    httpx.post(f"{server.url}/v1/swap", json={"appearance": ["!"], "structure": ["!"]})
    text = httpx.get(f"{server.url}/v1/metrics").text
    assert 'reidgen_http_requests_total{endpoint="/v1/swap",method="POST",status="200"}' in text
    assert 'reidgen_http_errors_total{code="bad_base64",endpoint="/v1/swap"}' in text
    assert "reidgen_engine_batch_images_count" in text and "reidgen_engine_queue_depth" in text
    assert 'reidgen_http_request_duration_seconds_bucket{endpoint="/v1/render"' in text
    assert 'endpoint="other"' in text  # unknown paths share one label


# -- auth, through the real entry point ----------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_api_key_through_serve(trained, tmp_path):
    import inspect
    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-key\n")
    port = free_port()
    code = (f"from generator_service.http.serve import serve; serve({str(trained['models'])!r}, port={port}, "
            f"api_key_file={str(key_file)!r}, device='cpu', log_level='warning')")
    env = {**os.environ, "PYTHONPATH": str(REPO), "REIDGEN_API_KEY": "not-this-one"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            return httpx.get(f"{url}/v1/readyz").status_code == 200
        wait_for(up, 90, "the serve() subprocess")
        assert httpx.get(f"{url}/v1/healthz").status_code == 200
        for path in ("/v1/models", "/v1/metrics", "/openapi.json", "/docs"):
            assert "API key" in error_of(httpx.get(f"{url}{path}"), 401, "unauthorized")
        ok = b64(trained["people"][0])
        body = {"appearance": [ok], "structure": [ok]}
        error_of(httpx.post(f"{url}/v1/swap", json=body), 401, "unauthorized")
        error_of(httpx.post(f"{url}/v1/swap", json=body, headers={"X-API-Key": "not-this-one"}), 401, "unauthorized")
        assert httpx.post(f"{url}/v1/swap", json=body, headers={"X-API-Key": "s3cret-key"}).status_code == 200
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
        with ServiceClient(url, api_key="s3cret-key") as client:
            assert client.models().limits.auth is True
        with ServiceClient(url) as client, pytest.raises(ServiceError) as err:
            client.models()
        assert err.value.status == 401
        doc = httpx.get(f"{url}/openapi.json", headers={"X-API-Key": "s3cret-key"}).json()
        assert doc["paths"]["/v1/healthz"]["get"]["security"] == []
        assert {"ApiKeyHeader": []} in doc["paths"]["/v1/swap"]["post"]["security"]
    finally:
        proc.terminate()
        proc.wait(15)


# -- backpressure, deadlines, batching, failures -------------------------------------------------
class FlakyNet:
    """A real DG-Net wrapped for tests: slow decoding, simulated CUDA out-of-memory above ``fit``
    images per decode, an error on NaN inputs, or an internal failure on demand."""

    def __init__(self, net, delay: float = 0.0, fit: int | None = None):
        self.net, self.delay, self.fit = net, delay, fit
        self.fail = False
        self.decodes: list[int] = []
        self.decoding = threading.Event()

    def __getattr__(self, name):
        return getattr(self.net, name)

    def encode_appearance(self, x):
        if torch.isnan(x).any():
            raise ValueError("NaN in the input")
        return self.net.encode_appearance(x)

    def decode(self, a, s):
        self.decoding.set()
        if self.fail:
            raise RuntimeError("secret internal detail")
        if self.delay:
            time.sleep(self.delay)
        if self.fit is not None and len(a) > self.fit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        self.decodes.append(len(a))
        return self.net.decode(a, s)


def test_backpressure_deadline_and_internal_errors(server, trained):
    dg = server.engine.model_for("swap")
    slow = FlakyNet(dg.net, delay=0.5)
    engine = Engine([replace(dg, net=slow)], "cpu", max_batch=4, max_wait_ms=50, queue_size=2)
    with LiveServer(create_app(engine, Settings(**LIMITS))) as live:
        body = {"appearance": [b64(trained["people"][0])], "structure": [b64(trained["people"][1])]}
        with ThreadPoolExecutor(10) as pool, httpx.Client(timeout=30, limits=httpx.Limits(max_connections=10)) as c:
            responses = list(pool.map(lambda _: c.post(f"{live.url}/v1/swap", json=body), range(10)))
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) == {200, 503} and statuses.count(503) >= 1, statuses
        for r in responses:
            if r.status_code == 503:
                assert "busy" in error_of(r, 503, "queue_full") and int(r.headers["Retry-After"]) >= 1
        text = httpx.get(f"{live.url}/v1/metrics").text
        merged = dict(line.rsplit(" ", 1) for line in text.splitlines()
                      if line.startswith("reidgen_engine_batch_requests_"))
        assert float(merged['reidgen_engine_batch_requests_sum{op="swap"}']) > \
            float(merged['reidgen_engine_batch_requests_count{op="swap"}'])  # requests were merged
        assert 'reidgen_http_errors_total{code="queue_full",endpoint="/v1/swap"}' in text

        # A request whose deadline passes while it waits behind a busy batch: 504.
        slow.decoding.clear()
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, f"{live.url}/v1/swap", json=body, timeout=30)
            assert slow.decoding.wait(10)
            late = httpx.post(f"{live.url}/v1/swap", json=body, headers={"X-Timeout-Ms": "100"})
            assert first.result().status_code == 200
        assert "deadline" in error_of(late, 504, "deadline_exceeded")

        slow.fail = True  # an internal failure: a generic 500, no details, no traceback
        msg = error_of(httpx.post(f"{live.url}/v1/swap", json=body), 500, "internal_error")
        assert "secret" not in msg
        slow.fail = False


def test_engine_merges_splits_on_oom_and_isolates_failures(server, trained):
    dg = server.engine.model_for("swap")
    x = torch.stack([dg.image_tensor(decode_image_bytes(p)) for p in trained["people"]])
    reference = server.engine.swap_batch(x, x.flip(0))
    flaky = FlakyNet(dg.net, fit=2)
    engine = Engine([replace(dg, net=flaky)], "cpu", max_batch=8, max_wait_ms=300, queue_size=8).start()
    batches = []
    engine.add_observer(lambda op, model, images, requests, s: batches.append((images, requests)))
    try:
        # One call of 4 pairs: out of memory at 8 and 4 per decode, done at 2.
        assert torch.allclose(engine.swap_batch(x, x.flip(0)), reference, atol=1e-5)
        assert flaky.decodes == [2, 2]
        # Three queued requests are merged, OOM splits them, each gets its own images.
        items = [SwapItem(x[i:i + 2], x.flip(0)[i:i + 2]) for i in (0, 1, 2)]
        futures = [engine.submit("swap", engine.model_for("swap"), it) for it in items]
        for i, f in enumerate(futures):
            assert torch.allclose(f.result(30), reference[i:i + 2], atol=1e-5)
        # A failing request (NaN input) fails alone; the others of its batch succeed.
        bad = SwapItem(torch.full_like(x[:1], float("nan")), x[:1])
        futures = [engine.submit("swap", engine.model_for("swap"), it) for it in (items[0], bad, items[2])]
        assert torch.allclose(futures[0].result(30), reference[0:2], atol=1e-5)
        with pytest.raises(ValueError, match="NaN"):
            futures[1].result(30)
        assert torch.allclose(futures[2].result(30), reference[2:4], atol=1e-5)
        # Merging without OOM: four single-pair requests, one model call.
        flaky.fit = None
        batches.clear()
        futures = [engine.submit("swap", engine.model_for("swap"), SwapItem(x[i:i + 1], x[i:i + 1])) for i in range(4)]
        [f.result(30) for f in futures]
        assert batches == [(4, 4)]
        batches.clear()  # batching off (Settings.batching=False): the same queue, no merging
        futures = [engine.submit("swap", engine.model_for("swap"), SwapItem(x[:1], x[:1]), alone=True)
                   for _ in range(2)]
        [f.result(30) for f in futures]
        assert batches == [(1, 1), (1, 1)]
        # A request whose deadline passes while it waits (here: for the batch to fill) is dropped.
        with pytest.raises(DeadlineExceeded, match="queued"):
            engine.submit("swap", engine.model_for("swap"), items[0], timeout_s=0.05).result(30)
    finally:
        engine.close()


# -- the OpenAPI document: complete, its examples run, and a bounded fuzz finds no 5xx -----------
def test_openapi_document_is_complete_and_its_examples_run(server):
    doc = httpx.get(f"{server.url}/openapi.json").json()
    schemas = doc["components"]["schemas"]
    for name in ("SwapRequest", "SwapForm", "SwapResponse", "RenderRequest", "RenderResponse", "InterpolateRequest",
                 "InterpolateResponse", "ModelsResponse", "HealthResponse", "ReadyResponse", "ErrorBody"):
        assert name in schemas, name
    swap = doc["paths"]["/v1/swap"]["post"]
    assert set(swap["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    assert set(swap["responses"]["200"]["content"]) == {"application/json", "image/png", "image/jpeg"}
    assert {"400", "401", "404", "413", "415", "422", "500", "503", "504"} <= set(swap["responses"])
    assert "Retry-After" in swap["responses"]["503"]["headers"]
    for path, name in (("/v1/swap", "SwapRequest"), ("/v1/render", "RenderRequest"),
                       ("/v1/interpolate", "InterpolateRequest")):
        assert schemas[name]["examples"]
        for example in schemas[name]["examples"]:
            r = httpx.post(f"{server.url}{path}", json=example)
            assert r.status_code == 200, (path, r.text[:300])


def fuzz_openapi(url: str, only: str = "") -> dict[str, list[int]]:
    """A bounded, derandomised schemathesis run over the operations of ``url``'s OpenAPI document
    whose path starts with ``only``: every answer must conform to the document, and none may be
    a 5xx (but a requested deadline of a few milliseconds rightly gets the documented 504).
    Returns the status codes seen per operation."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    checks = [status_code_conformance, content_type_conformance, response_schema_conformance]

    def asked_for_it(case, response) -> bool:
        timeout = str((case.headers or {}).get("X-Timeout-Ms", ""))
        return (response.status_code == 504 and timeout.isdigit() and int(timeout) < 1000
                and response.json()["error"]["code"] == "deadline_exceeded")
    statuses: dict[str, list[int]] = {}

    def fuzz(operation, mode):
        """15 generated requests (30 per operation over both modes), derandomised: reproducible."""
        @settings(max_examples=15, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case):
            response = case.call(base_url=url, timeout=30)
            statuses.setdefault(operation.label, []).append(response.status_code)
            assert response.status_code < 500 or asked_for_it(case, response), (response.status_code,
                                                                                 response.text[:300])
            case.validate_response(response, checks=checks)
        check()

    for result in schema.get_all_operations():
        operation = result.ok()
        if not operation.path.startswith(only):
            continue
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            try:
                fuzz(operation, mode)
            except Unsatisfiable:  # negative data for an operation that takes no input
                assert mode is schemathesis.GenerationMode.NEGATIVE and operation.method.upper() == "GET"
    return statuses


def test_fuzz_from_openapi_finds_no_server_error(server):
    statuses = fuzz_openapi(server.url)
    assert len(statuses) == 7, statuses
    assert sum(len(codes) for codes in statuses.values()) >= 7 * 2 * 5


def test_fuzz_of_the_jobs_endpoints_finds_no_server_error(broker, tmp_path):
    """POST /v1/jobs, GET and DELETE /v1/jobs/{id} on a server with the Celery jobs backend (a real
    Redis, database 13, a key prefix and queue of this run) and its roots. The jobs routes never
    touch the engine: it serves a stand-in model."""
    from generator_service.inference.engine import ServedModel
    from reidgen.core.paths import data_root
    from worker.celery_app import make_app
    from worker.jobs import CeleryJobs, JobStore

    stand_in = ServedModel(name="stand-in", kind="dgnet", checkpoint="stand-in.pt", identity="0", step=None,
                           preset=None, image_size=(128, 64), net=None)
    engine = Engine([stand_in], "cpu")
    engine.warmed = True
    (tmp_path / "shards").mkdir()
    settings = Settings(models_root=tmp_path, data_root=data_root(), shards_root=tmp_path / "shards")
    jobs = CeleryJobs(JobStore(broker["client"], broker["prefix"]), make_app())
    with LiveServer(create_app(engine, settings, jobs=jobs)) as live:
        statuses = fuzz_openapi(live.url, only="/v1/jobs")
    assert set(statuses) == {"POST /v1/jobs", "GET /v1/jobs/{job_id}", "DELETE /v1/jobs/{job_id}"}, statuses
    posted = statuses["POST /v1/jobs"]
    print({op: sorted(set(codes)) for op, codes in statuses.items()})
    assert len(posted) >= 2 * 5 and {400, 422} <= set(posted), posted  # spec checks and name checks both ran
