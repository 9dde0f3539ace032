"""Safe to expose (issue 12): jobs confined to the server's roots and bounded, the queue bounded in
images and refused before a body is read, slow or heavy clients dropped.

Through real uvicorn servers on loopback ports, configured as `reidgen serve` configures them
(`generator_service.http.serve.uvicorn_config`: the guarded h11 protocol, keep-alive and the
connection cap), with the Celery jobs backend on a real Redis (``$REDIS_URL``, database 13, a key
prefix and queue of this run; no worker is needed: nothing here gets as far as a shard, except
the in-process task of `test_a_worker_confines_a_task_to_its_own_roots`). The generator is a
real tiny DG-Net (conftest's ``tiny_dgnet``) wherever requests reach it.
"""
from __future__ import annotations

import base64
import io
import json
import os
import socket
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from api_schemas.service import ErrorBody
from generator_service.http import Settings, create_app
from generator_service.http.serve import uvicorn_config
from generator_service.inference.engine import Engine, QueueFull
from generator_service.inference.kinds import SwapItem
from reidgen.core.checkpoint import save_checkpoint
from reidgen.core.market import link_subset
from reidgen.core.paths import data_root
from tests.live import Live

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def error_of(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, (response.status_code, response.text[:400])
    body = ErrorBody.model_validate_json(response.content)
    assert body.error.code == code, body
    return body.error.message


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(root.rglob("*"))}


# -- roots and bounds of jobs ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def place(tmp_path_factory, market_mini) -> dict[str, Path]:
    """The server's three roots, and a folder outside them that must stay untouched. Each root holds
    a symlink leading out of it."""
    base = tmp_path_factory.mktemp("exposure")
    outside, models, data, shards = (base / n for n in ("outside", "models", "data", "shards"))
    for folder in (outside, models, data, shards):
        folder.mkdir()
    (outside / "secret.pt").write_bytes(b"SECRET-BYTES")
    link_subset(market_mini, outside / "market", ids=2)
    # Checkpoint headers (no weights: no worker loads them here), enough for the submission's check.
    save_checkpoint(models / "dgnet.pt", "dgnet", {})
    save_checkpoint(models / "teacher.pt", "reid", {})
    (models / "escape.pt").symlink_to(outside / "secret.pt")
    link_subset(market_mini, data / "mini", ids=4)  # a real folder of the data root (images link out: fine)
    (data / "escape").symlink_to(outside / "market")
    (shards / "escape").symlink_to(outside)
    return {"base": base, "outside": outside, "models": models, "data": data, "shards": shards}


@pytest.fixture(scope="module")
def jobs_server(broker, place, tiny_dgnet):
    """A server with the Celery jobs backend and the roots of ``place``."""
    from worker.celery_app import make_app
    from worker.jobs import CeleryJobs, JobStore

    settings = Settings(models_root=place["models"], data_root=place["data"], shards_root=place["shards"],
                        min_shard_size=8, dispatch_window=8)
    store = JobStore(broker["client"], broker["prefix"])
    engine = Engine.from_checkpoint(tiny_dgnet["dgnet"], "cpu")
    with Live(create_app(engine, settings, jobs=CeleryJobs(store, make_app())), settings) as live:
        live.settings, live.store = settings, store
        yield live


def job_body(**spec) -> dict:
    base = {"kind": "dgnet_random_structures", "checkpoint": "dgnet", "data": "mini", "subset": 8,
            "structures_per_image": 1, "shard_size": 64}
    out = spec.pop("out", "job")
    return {"spec": {**base, **spec}, "out": out}


def redis_keys(broker) -> set[bytes]:
    return set(broker["client"].scan_iter(f"{broker['prefix']}*"))


OUTSIDE = "OUTSIDE"  # replaced by the outside folder's absolute path
BAD_NAMES = [
    ("checkpoint", f"{OUTSIDE}/secret.pt", "is outside"),
    ("checkpoint", "../outside/secret.pt", "contains '..'"),
    ("checkpoint", "escape.pt", "resolves outside"),
    ("checkpoint", "", "spec.checkpoint: String should have at least 1 character"),
    ("teacher", f"{OUTSIDE}/secret.pt", "is outside"),
    ("teacher", "sub/../../outside/secret.pt", "contains '..'"),
    ("teacher", "escape", "resolves outside"),  # escape.pt, as the model name 'escape'
    ("teacher", "", "is empty"),
    ("data", f"{OUTSIDE}/market", "is outside"),
    ("data", "..", "contains '..'"),
    ("data", "escape", "resolves outside"),
    ("data", "mini\0", "must not contain a NUL character"),
    ("out", f"{OUTSIDE}/new", "is outside"),
    ("out", "../outside/new", "contains '..'"),
    ("out", "escape/new", "resolves outside"),
    ("out", ".", "names this server's shards root itself"),
    ("out", "", "out: String should have at least 1 character"),
    ("out", "new\0", "must not contain a NUL character"),
]


@pytest.mark.parametrize("field, name, words", BAD_NAMES,
                         ids=[f"{f}={n.replace(chr(0), 'NUL') or 'empty'}" for f, n, _ in BAD_NAMES])
def test_job_names_outside_the_roots_are_400_naming_the_field(jobs_server, broker, place, field, name, words):
    name = name.replace(OUTSIDE, str(place["outside"]))
    body = job_body()
    if field == "out":
        body["out"] = name
    else:
        body["spec"][field] = name
    before, keys = snapshot(place["base"]), redis_keys(broker)
    message = error_of(httpx.post(f"{jobs_server.url}/v1/jobs", json=body), 400, "path_not_allowed")
    where = "out: " if field == "out" else f"spec.{field}: "
    assert message.startswith(where) and words in message, message
    if "NUL" not in words and "at least 1" not in words:
        assert "root" in message and "without '..'" in message or "root itself" in message  # what is allowed
    for root in ("models", "data", "shards"):  # the client learns no server path
        assert str(place[root]) not in message
    assert snapshot(place["base"]) == before and redis_keys(broker) == keys  # nothing written, nothing queued


def test_names_inside_the_roots_are_accepted(jobs_server, place):
    """The control: model names with or without .pt, a data set name, an out folder name or an
    absolute path inside the shards root; job.json lands inside the shards root."""
    for out, spec in (("plain", {}), (str(place["shards"] / "absolute"), {"checkpoint": "dgnet.pt", "seed": 1}),
                      ("nested/deeper", {"teacher": "teacher", "seed": 2})):
        r = httpx.post(f"{jobs_server.url}/v1/jobs", json={**job_body(**spec), "out": out})
        assert r.status_code == 202, r.text
        assert r.json()["out"] == out
        assert (place["shards"] / out / "job.json").is_file()  # an absolute `out` stays what it is
        httpx.delete(f"{jobs_server.url}/v1/jobs/{r.json()['id']}")
    assert not (place["outside"] / "plain").exists()


def test_a_worker_confines_a_task_to_its_own_roots(broker, place, monkeypatch, tiny_dgnet):
    """A task whose out or data leads outside the worker's roots (sent by whoever can reach
    Redis, or by `reidgen generate --submit` with a path the workers do not take) fails its job
    with the same 400-style error, and writes nothing."""
    import worker.tasks as tasks
    from api_schemas.jobs import JobRequest, JobSpec
    from worker.celery_app import make_app
    from worker.jobs import JobStore, submit_job

    for var, root in (("REIDGEN_MODELS_ROOT", "models"), ("REIDGEN_DATA", "data"), ("REIDGEN_SHARDS_ROOT", "shards")):
        monkeypatch.setenv(var, str(place[root]))
    store = JobStore(broker["client"], broker["prefix"])
    monkeypatch.setattr(tasks, "_store", store)
    spec = JobSpec(kind="dgnet_random_structures", checkpoint=str(tiny_dgnet["dgnet"]),
                   data=str(place["data"] / "mini"), subset=4, structures_per_image=1, shard_size=64)
    out = place["outside"] / "from-a-task"
    job = submit_job(JobRequest(spec=spec, out=str(out)), store, make_app())  # the CLI's way: paths, unconfined
    before = snapshot(place["outside"])
    result = tasks.generate_shard_task(job, spec.model_dump_json(), str(out), 0)
    assert result["status"] == "failed"
    status = store.status(job)
    assert status.state == "failed"
    [error] = status.error_details
    assert error.code == "path_not_allowed" and error.message.startswith("spec.checkpoint: ")
    assert snapshot(place["outside"]) == before


def test_jobs_are_bounded_in_records_shards_and_number(jobs_server, broker):
    url, s = f"{jobs_server.url}/v1/jobs", jobs_server.settings
    saved = (s.max_job_records, s.max_job_tasks, s.max_active_jobs)
    try:
        s.max_job_records = 10
        message = error_of(httpx.post(url, json=job_body(structures_per_image=3)), 400, "job_too_large")
        assert "plans 18 records" in message and "at most 10 per job" in message
        s.max_job_records = saved[0]
        message = error_of(httpx.post(url, json=job_body(shard_size=2)), 400, "shard_too_small")
        assert message.startswith("spec.shard_size: 2 is below") and "minimum of 8" in message
        # A job that fits in one shard may have a smaller one.
        assert httpx.post(url, json=job_body(subset=4, shard_size=4, out="one-shard")).status_code == 202
        s.max_job_tasks = 2
        message = error_of(httpx.post(url, json=job_body(structures_per_image=3, shard_size=8)), 400,
                           "too_many_tasks")
        assert "makes 3 shards" in message and "at least 9" in message
        s.max_job_tasks = saved[1]

        for job_id in jobs_server.store.active_jobs():
            httpx.delete(f"{url}/{job_id}")
        s.max_active_jobs = 2
        first = [httpx.post(url, json=job_body(seed=10 + i, out=f"active-{i}")) for i in range(2)]
        assert [r.status_code for r in first] == [202, 202]
        refused = httpx.post(url, json=job_body(seed=12, out="active-2"))
        assert "as many as it takes" in error_of(refused, 429, "too_many_jobs")
        assert int(refused.headers["Retry-After"]) >= 1
        httpx.delete(f"{url}/{first[0].json()['id']}")  # a job ends: room for the next
        assert httpx.post(url, json=job_body(seed=12, out="active-2")).status_code == 202
    finally:
        s.max_job_records, s.max_job_tasks, s.max_active_jobs = saved
        for job_id in jobs_server.store.active_jobs():
            httpx.delete(f"{url}/{job_id}")


def test_a_huge_plan_is_counted_not_held_and_a_large_job_is_queued_lazily(jobs_server, broker, place):
    """All pairs of full Market-1501 (167M records, 2.7 GB as a list of pairs) are refused at
    once, in bounded memory; a large allowed job answers at once and queues only the dispatch
    window of tasks."""
    url, s = f"{jobs_server.url}/v1/jobs", jobs_server.settings
    if not (data_root() / "market1501" / "bounding_box_train").is_dir():
        pytest.skip("full market1501 not found under REIDGEN_DATA")
    saved = s.data_root
    s.data_root = data_root()  # the real data sets, for this test
    queue = broker["client"]
    queue_key = f"{broker['prefix']}{os.environ['REIDGEN_QUEUE']}"
    try:
        tracemalloc.start()  # numpy's arrays are traced too
        started = time.monotonic()
        r = httpx.post(url, json=job_body(kind="dgnet_all_pairs", data="market1501", subset=None, shard_size=1024),
                       timeout=60)
        seconds = time.monotonic() - started
        peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        message = error_of(r, 400, "job_too_large")
        assert "plans 167030222 records" in message
        print(f"167M-record plan refused in {seconds:.2f} s, traced peak {peak_mb:.1f} MB")
        assert seconds < 20 and peak_mb < 100, (seconds, peak_mb)  # the pairs alone would be 2.7 GB

        queued = queue.llen(queue_key)
        started = time.monotonic()
        r = httpx.post(url, json=job_body(kind="dgnet_all_pairs", data="market1501_mini", subset=400, out="large"))
        seconds = time.monotonic() - started
    finally:
        s.data_root = saved
    assert r.status_code == 202, r.text
    status = r.json()
    assert status["shards_total"] > 1000 and status["records_planned"] > 64_000
    assert queue.llen(queue_key) - queued == s.dispatch_window  # the rest: one per finished shard
    print(f"job of {status['shards_total']} shards accepted in {seconds:.2f} s, {s.dispatch_window} tasks queued")
    assert seconds < 5, seconds
    httpx.delete(f"{url}/{status['id']}")


# -- the generate queue: counted in images, refused before the body --------------------------------
class Gate:
    """A real DG-Net whose decoder waits for ``open`` (the batcher is busy while it is shut)."""

    def __init__(self, net):
        self.net, self.open, self.entered = net, threading.Event(), threading.Event()
        self.open.set()
        self.delay = 0.0

    def __getattr__(self, name):
        return getattr(self.net, name)

    def decode(self, a, s):
        self.entered.set()
        assert self.open.wait(30)
        time.sleep(self.delay)
        return self.net.decode(a, s)


def png(colour=(90, 120, 150)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 128), colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def raw(port: int, data: bytes, wait: float = 2.0) -> bytes:
    """Send ``data`` on a fresh connection; the response (head and body) that comes back within
    ``wait`` seconds."""
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(data)
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return got
            got += chunk
            head, _, body = got.partition(b"\r\n\r\n")
            length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")]
            if not chunk or (length and len(body) >= length[0]):
                return got


def test_queue_bound_counts_images_and_503_comes_before_the_body(tiny_dgnet):
    served = next(iter(Engine.from_checkpoint(tiny_dgnet["dgnet"], "cpu").models.values()))
    gate = Gate(served.net)
    engine = Engine([replace(served, net=gate)], "cpu", max_batch=4, max_wait_ms=0, queue_size=4)
    engine.warmed = True  # no warm-up: every batch is one of the test's
    settings = Settings()
    with Live(create_app(engine, settings), settings) as live, ThreadPoolExecutor(4) as pool:
        one = {"appearance": [png()], "structure": [png((10, 20, 30))]}
        grid = {"appearance": [png()] * 2, "structure": [png((10, 20, 30))] * 2, "mode": "grid"}
        gate.delay = 2.0  # one slow batch: the measured drain rate is 2 s per image
        assert httpx.post(f"{live.url}/v1/swap", json=one, timeout=60).status_code == 200
        gate.delay, gate.entered = 0.0, threading.Event()
        gate.open.clear()
        busy = pool.submit(httpx.post, f"{live.url}/v1/swap", json=one, timeout=60)
        assert gate.entered.wait(30)  # the batcher is held by the first request
        queued = pool.submit(httpx.post, f"{live.url}/v1/swap", json=grid, timeout=60)
        deadline = time.monotonic() + 20
        while engine.queued_images() < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.queued_images() == 4 and engine.queue_depth() == 1  # one request, four images
        with pytest.raises(QueueFull):  # one more image does not fit (counted in requests, it would)
            engine.submit("swap", served, SwapItem(torch.zeros(1, 3, 128, 64), torch.zeros(1, 3, 128, 64)))
        # A head announcing a 50 kB body, and no body: the 503 comes without waiting for it.
        started = time.monotonic()
        answer = raw(live.port, b"POST /v1/swap HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                b"Content-Length: 50000\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503") and b"queue_full" in answer, answer[:300]
        assert time.monotonic() - started < 3  # not the 60 s body deadline
        retry = int(next(line.split(b":")[1] for line in answer.split(b"\r\n")
                         if line.lower().startswith(b"retry-after")))
        assert retry == engine.retry_after()  # (images waiting + 1) × the measured seconds per image
        assert retry >= 3  # 5 images at the measured ~0.4+ s each: not the old constant 1
        gate.open.set()
        assert busy.result().status_code == 200 and queued.result().status_code == 200
        assert len(queued.result().json()["images"]) == 4


# -- connections: slow clients, the cap, heavy JSON ----------------------------------------------
@pytest.fixture(scope="module")
def tight(tiny_dgnet):
    settings = Settings(header_timeout_s=1.0, body_timeout_s=1.0, keep_alive_s=1.0, max_connections=40)
    engine = Engine.from_checkpoint(tiny_dgnet["dgnet"], "cpu")
    with Live(create_app(engine, settings), settings) as live:
        live.settings = settings
        yield live


def closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the server closes ``sock`` within ``seconds``, and what it sent before."""
    got = b""
    sock.settimeout(0.1)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return True, got
        if not chunk:
            return True, got
        got += chunk
    return False, got


def health_latency(url: str, seconds: float) -> float:
    """The slowest of /v1/healthz answers polled for ``seconds`` (each must be 200)."""
    worst, deadline = 0.0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.monotonic()
        assert httpx.get(f"{url}/v1/healthz", timeout=5).status_code == 200
        worst = max(worst, time.monotonic() - started)
        time.sleep(0.05)
    return worst


def test_slow_clients_are_closed(tight):
    """16 connections with half a head and 16 chunked bodies that never end (loopback, bounded):
    all are closed once the head and body deadlines (1 s) have passed, the latter with a 408,
    while health answers at once."""
    half_heads, endless = [], []
    for _ in range(16):
        s = socket.create_connection(("127.0.0.1", tight.port))
        s.sendall(b"POST /v1/swap HTTP/1.1\r\nHost: x\r\nContent-Ty")
        half_heads.append(s)
    for _ in range(16):
        s = socket.create_connection(("127.0.0.1", tight.port))
        s.sendall(b"POST /v1/swap HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"app\r\n")
        endless.append(s)
    started = time.monotonic()
    try:
        assert health_latency(tight.url, 0.5) < 0.5
        results = [closed_within(s, 4.0 - (time.monotonic() - started)) for s in half_heads + endless]
    finally:
        for s in half_heads + endless:
            s.close()
    assert all(closed for closed, _ in results), [closed for closed, _ in results]
    assert all(got == b"" for _, got in results[:16])  # no request: nothing to answer
    for _, got in results[16:]:
        assert got.startswith(b"HTTP/1.1 408") and b"body_timeout" in got, got[:200]
    print(f"32 slow clients closed within {time.monotonic() - started:.2f} s (head and body deadlines 1 s)")
    assert time.monotonic() - started < 4.0


def test_connections_are_capped_and_idle_ones_closed(tight):
    idle = [socket.create_connection(("127.0.0.1", tight.port)) for _ in range(tight.settings.max_connections)]
    try:
        time.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", tight.port))
        closed, got = closed_within(extra, 0.5)  # over the cap: closed before anything is read
        extra.close()
        assert closed and got == b""
        results = [closed_within(s, 3.0) for s in idle]  # sent nothing: closed after the head deadline
        assert all(closed for closed, _ in results)
    finally:
        for s in idle:
            s.close()
    assert httpx.get(f"{tight.url}/v1/healthz").status_code == 200


def test_heavy_json_is_refused_before_parsing_and_health_stays_responsive(tight):
    """Four 7 MB bodies of 600k keys at once: each refused in well under a second (parsing and
    validating them took ~5 s of CPU each), and /v1/healthz keeps answering."""
    bomb = json.dumps({"appearance": [png()], "structure": [png()], "extra": {f"{i:x}": 0 for i in range(600_000)}},
                      separators=(",", ":")).encode()
    assert 5 * 2**20 < len(bomb) < tight.settings.max_body_bytes
    deep = b'{"appearance": ' + b"[" * 200 + b"]" * 200 + b"}"

    def post(body):
        started = time.monotonic()
        r = httpx.post(f"{tight.url}/v1/swap", content=body, headers={"content-type": "application/json"},
                       timeout=30)
        return r, time.monotonic() - started

    with ThreadPoolExecutor(5) as pool:
        bombs = [pool.submit(post, bomb) for _ in range(4)]
        worst_health = pool.submit(health_latency, tight.url, 1.0)
        for future in bombs:
            r, seconds = future.result()
            assert "more than 4096 members" in error_of(r, 413, "json_too_complex")
            assert seconds < 5, seconds
            print(f"JSON bomb of {len(bomb) / 2**20:.1f} MB refused in {seconds:.2f} s")
        worst = worst_health.result()
        print(f"slowest /v1/healthz during four bombs: {worst * 1000:.0f} ms")
        assert worst < 2.0  # it stalled for up to 9.6 s before
    assert "nests 201 levels" in error_of(post(deep)[0], 413, "json_too_complex")
    big_job = json.dumps({"spec": {"kind": "dgnet_all_pairs", "checkpoint": "x" * 70_000, "data": "d"},
                          "out": "o"}).encode()
    r = httpx.post(f"{tight.url}/v1/jobs", content=big_job, headers={"content-type": "application/json"})
    assert "at most 65536" in error_of(r, 413, "body_too_large")  # a job's body has a bound of its own


def test_serve_flags_reach_the_settings(monkeypatch, tmp_path):
    """`reidgen serve`'s flags (roots, job bounds, connection limits) become the one `Settings`
    the app and uvicorn are built from; unset ones keep the environment's defaults."""
    import generator_service.http.serve as serve_module
    from reidgen.cli import main

    captured = {}
    monkeypatch.setattr(serve_module, "serve", lambda models, **kw: captured.update(kw, models=models))
    monkeypatch.setenv("REIDGEN_SHARDS_ROOT", str(tmp_path / "env-shards"))
    assert main(["serve", "--models", str(tmp_path / "m"), "--no-jobs", "--data-root", str(tmp_path / "d"),
                 "--max-active-jobs", "3", "--min-shard-size", "32", "--header-timeout", "2.5",
                 "--max-connections", "9", "--queue-size", "100"]) == 0
    limits = {k: v for k, v in captured.items() if k in Settings.__dataclass_fields__}
    settings = Settings.from_env(models_root=captured["models"], **limits)
    assert settings.models_root == tmp_path / "m" and settings.data_root == tmp_path / "d"
    assert settings.shards_root == tmp_path / "env-shards"  # no flag: the environment's
    assert (settings.max_active_jobs, settings.min_shard_size, settings.header_timeout_s,
            settings.max_connections) == (3, 32, 2.5, 9)
    assert settings.max_job_records == 2_000_000 and settings.body_timeout_s == 60.0  # defaults kept
    assert captured["queue_size"] == 100
    config = uvicorn_config(object(), settings)
    assert config.http.header_timeout_s == 2.5 and config.http.max_connections == 9
    assert config.limit_concurrency == 10 and config.timeout_keep_alive == 5
