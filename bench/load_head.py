"""Benchmark: the head node under load, the api and Redis with many jobs and many workers (issue 26).

One run, on the local Redis and a `reidgen serve` child process on a loopback port:

1. ``--workers`` `reidgen worker` processes (one pool process each, as one per GPU in the
   deployment) start and report ready;
2. ``--jobs`` jobs are submitted to POST /v1/jobs by ``--clients`` concurrent clients as fast as the
   server takes them (a 429 or 503 is retried after its Retry-After, as a client must); the jobs are
   as small as a job can be (one record, one shard), so the workers do little and the head's own
   cost shows: planning, the job record, the queue;
3. meanwhile ``--pollers`` clients call GET /v1/jobs/{id} of jobs already accepted, without pause,
   and Redis's INFO memory and queue length are sampled every 0.2 s;
4. then the run waits until every job has ended (the workers drain the queue), still polling;
5. then the workers stop and ``--queued`` more jobs are submitted, which nothing takes: the queue
   alone, to weigh a queued shard.

Reported: jobs/s accepted and the POST latency; GET /v1/jobs/{id} latency (p50, p99, max) while
jobs are being submitted and while they drain; jobs/s finished; Redis memory per queued shard
(INFO memory's used_memory before and after the queue phase, per shard queued: the queue's
message and its job's record) and per ended job (used_memory at the end above the baseline, per
job), each also by MEMORY USAGE of the keys themselves (the queue's list per message; a job's
record and the sets beside it).

``--max-active-jobs`` (default: ``--jobs`` plus ``--queued``) is the server's bound on jobs queued or
running. The deployment's default, 16, answers the 17th job with 429 and Retry-After: 60, so a
client honouring it waits a minute per refusal, whatever the head could do; this benchmark
measures the head itself, so it lifts the bound, as a lab queueing many jobs must.

Unless ``--models`` holds them already, a DG-Net (small preset, small_cnn appearance encoder) and
its teacher are trained there (or in a temporary folder) for two iterations on 4 identities of
market1501_mini, as the tests do: their quality does not matter. Redis: ``--redis-url`` (default
database 12 of the local one), with a key prefix and a queue of this run only, removed at the end.

    python bench/load_head.py [--jobs 1000] [--workers 16] [--clients 16] [--pollers 4]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable as a plain script from any directory

from bench.common import write_results  # noqa: E402

OUT = REPO / "bench" / "results" / "load_head.json"
READY_LINE = " ready."  # Celery's "celery@NAME ready." when a worker takes tasks


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def latency_ms(values: list[float]) -> dict:
    return {"n": len(values), "p50_ms": _ms(percentile(values, 50)), "p99_ms": _ms(percentile(values, 99)),
            "max_ms": _ms(max(values) if values else None)}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the models -------------------------------------------------------------------------------------
def train_models(data: Path, models: Path, work: Path) -> str:
    """models/teacher and models/dgnet, trained like tests/conftest.py's tiny_dgnet; returns the name."""
    import torch

    from reidgen.core.market import link_subset
    from trainer.tasks.dgnet import dgnet_preset_config, train_dgnet
    from trainer.tasks.reid import preset_config, train_reid

    torch.set_num_threads(1)
    subset = link_subset(data, work / "subset", ids=4)
    teacher = train_reid(preset_config("tiny", data=str(subset), epochs=1, workers=0, evaluate=False),
                         models / "teacher", progress=False)
    train_dgnet(dgnet_preset_config("small", data=str(subset), teacher=str(teacher), backbone="small_cnn",
                                    pretrained="none", workers=0, batch_size=4, grid_every=0, amp=False,
                                    iterations=2, checkpoint_every=10_000, quality_every=0),
                models / "dgnet", progress=False)
    return "dgnet"


# -- Redis ------------------------------------------------------------------------------------------
class Sampler(threading.Thread):
    """INFO memory's used_memory and the queue's length, every ``every`` seconds."""

    def __init__(self, client, queue_keys: list[str], every: float = 0.2):
        super().__init__(daemon=True)
        self.client, self.queue_keys, self.every = client, queue_keys, every
        self.samples: list[tuple[float, int, int]] = []  # (time, used_memory, shards queued)
        self.stop = threading.Event()

    def sample(self) -> tuple[float, int, int]:
        pipe = self.client.pipeline(transaction=False)
        pipe.info("memory")
        for key in self.queue_keys:
            pipe.llen(key)
        info, *lengths = pipe.execute()
        return time.monotonic(), int(info["used_memory"]), sum(lengths)

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append(self.sample())
            self.stop.wait(self.every)


def job_states(client, prefix: str, ids: list[str]) -> list[str]:
    pipe = client.pipeline(transaction=False)
    for job_id in ids:
        pipe.hget(f"{prefix}job:{job_id}", "state")
    return [(s or b"").decode() for s in pipe.execute()]


# -- the load -------------------------------------------------------------------------------------
async def load(url: str, args, spec: dict, states) -> dict:
    import httpx

    accepted: list[tuple[float, str]] = []  # (time accepted, job id)
    post_s: list[float] = []
    get_submit_s: list[float] = []
    get_drain_s: list[float] = []
    refused = {"429": 0, "503": 0, "other": 0}
    transport_errors = {"post": 0, "get": 0}  # connections closed under a request (counted, not retried)
    next_job = iter(range(args.jobs))
    submitting = True
    done = asyncio.Event()
    limits = httpx.Limits(max_connections=args.clients + args.pollers + 4)

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        async def submitter() -> None:
            for i in next_job:
                body = {"spec": {**spec, "seed": i}, "out": f"load-{i:05d}"}
                while True:
                    t = time.monotonic()
                    try:
                        r = await http.post("/v1/jobs", json=body)
                    except httpx.TransportError:  # not repeated: the job may have been taken
                        transport_errors["post"] += 1
                        break
                    post_s.append(time.monotonic() - t)
                    if r.status_code == 202:
                        accepted.append((time.monotonic(), r.json()["id"]))
                        break
                    key = str(r.status_code) if r.status_code in (429, 503) else "other"
                    refused[key] += 1
                    if key == "other":
                        raise RuntimeError(f"POST /v1/jobs answered {r.status_code}: {r.text[:300]}")
                    await asyncio.sleep(float(r.headers.get("Retry-After", "1")))

        async def poller() -> None:
            while not done.is_set():
                if not accepted:
                    await asyncio.sleep(0.01)
                    continue
                job_id = random.choice(accepted)[1]
                t = time.monotonic()
                try:
                    r = await http.get(f"/v1/jobs/{job_id}")
                except httpx.TransportError:
                    transport_errors["get"] += 1
                    continue
                (get_submit_s if submitting else get_drain_s).append(time.monotonic() - t)
                if r.status_code != 200:
                    raise RuntimeError(f"GET /v1/jobs/{job_id} answered {r.status_code}: {r.text[:300]}")

        pollers = [asyncio.create_task(poller()) for _ in range(args.pollers)]
        t0 = time.monotonic()
        await asyncio.gather(*(submitter() for _ in range(args.clients)))
        t_submitted = time.monotonic()
        submitting = False
        ids = [job_id for _, job_id in accepted]
        deadline = time.monotonic() + args.timeout
        ended: dict[str, str] = {}
        while len(ended) < len(ids):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(ids) - len(ended)} jobs not ended after {args.timeout} s")
            await asyncio.sleep(0.5)
            left = [j for j in ids if j not in ended]
            for job_id, state in zip(left, await asyncio.to_thread(states, left)):
                if state not in ("queued", "running"):
                    ended[job_id] = state
        t_done = time.monotonic()
        done.set()
        await asyncio.gather(*pollers)

    finals: dict[str, int] = {}
    for state in ended.values():
        finals[state] = finals.get(state, 0) + 1
    return {"t0": t0, "t_submitted": t_submitted, "t_done": t_done, "accepted": accepted, "post_s": post_s,
            "get_submit_s": get_submit_s, "get_drain_s": get_drain_s, "refused": refused,
            "transport_errors": transport_errors, "final_states": finals}


async def submit_only(url: str, spec: dict, first: int, count: int, clients: int) -> list[str]:
    """Submit ``count`` jobs (seeds and folders from ``first`` on) and return their ids; no polling."""
    import httpx

    ids: list[str] = []
    next_job = iter(range(first, first + count))
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=clients)) as http:
        async def submitter() -> None:
            for i in next_job:
                while True:
                    r = await http.post("/v1/jobs", json={"spec": {**spec, "seed": i}, "out": f"load-{i:05d}"})
                    if r.status_code == 202:
                        ids.append(r.json()["id"])
                        break
                    if r.status_code not in (429, 503):
                        raise RuntimeError(f"POST /v1/jobs answered {r.status_code}: {r.text[:300]}")
                    await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
        await asyncio.gather(*(submitter() for _ in range(clients)))
    return ids


def key_bytes(client, prefix: str, ids: list[str]) -> float | None:
    """The mean of MEMORY USAGE over the keys of each job (its record and the sets beside it)."""
    if not ids:
        return None
    totals = []
    for job_id in ids:
        keys = list(client.scan_iter(f"{prefix}job:{job_id}*"))
        totals.append(sum(client.memory_usage(k, samples=0) or 0 for k in keys))
    return sum(totals) / len(totals)


def wait_ready(logs: list[Path], procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        ready = sum(READY_LINE in log.read_text(errors="replace") for log in logs)
        if ready == len(logs):
            return
        for proc, log in zip(procs, logs):
            if proc.poll() is not None:
                raise RuntimeError(f"{log.name} exited ({proc.returncode}): {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{ready} of {len(logs)} processes ready after {timeout} s")
        time.sleep(1)


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--jobs", type=int, default=1000, help="jobs submitted (default 1000)")
    p.add_argument("--workers", type=int, default=16, help="worker processes taking tasks (default 16)")
    p.add_argument("--clients", type=int, default=16, help="concurrent submitting clients (default 16)")
    p.add_argument("--pollers", type=int, default=4, help="concurrent GET /v1/jobs/{id} clients (default 4)")
    p.add_argument("--queued", type=int, default=100, help="jobs submitted after the others, with the workers "
                                                            "stopped, to weigh a queued shard (default 100)")
    p.add_argument("--max-active-jobs", type=int, help="the server's bound on jobs queued or running "
                                                        "(default: --jobs plus --queued)")
    p.add_argument("--models", help="a models folder holding a DG-Net run named by --checkpoint; one "
                                    "without it gets a tiny one trained into it (default: a temporary folder)")
    p.add_argument("--checkpoint", default="dgnet", help="the DG-Net's name under --models (default dgnet)")
    p.add_argument("--teacher", default="teacher", help="its teacher's name under --models (default teacher)")
    p.add_argument("--data", default="market1501_mini", help="a data set name under $REIDGEN_DATA")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    p.add_argument("--header-timeout", type=float, default=10, help="the server's --header-timeout and "
                                                                     "--body-timeout (its defaults: 10 s, 60 s)")
    p.add_argument("--ready-seconds", type=float, default=1800, help="how long the server and workers may "
                                                                      "take to start (default 1800)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds the jobs may take to end")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the clean-up below runs on a kill too
    max_active = args.max_active_jobs or args.jobs + args.queued

    import redis

    from reidgen.core.settings import CommonSettings

    client = redis.Redis.from_url(args.redis_url)
    client.ping()
    data_root = CommonSettings.from_env().data_root
    tag = uuid.uuid4().hex[:8]
    prefix, queue = f"reidgen-load-{tag}:", f"load-{tag}"
    queue_keys = [f"{prefix}{queue}", f"{prefix}{queue}.redo"]
    procs: list[subprocess.Popen] = []
    work = Path(tempfile.mkdtemp(prefix="reidgen-load-"))
    try:
        models = Path(args.models).resolve() if args.models else work / "models"
        if not (models / args.checkpoint).exists():
            t = time.monotonic()
            print(f"training a tiny DG-Net into {models} ...", flush=True)
            args.checkpoint = train_models(data_root / args.data, models, work)
            print(f"  {time.monotonic() - t:.0f} s", flush=True)
        shards = work / "shards"
        shards.mkdir()
        env = {**os.environ, "REDIS_URL": args.redis_url, "REIDGEN_REDIS_PREFIX": prefix, "REIDGEN_QUEUE": queue,
               "REIDGEN_MODELS_ROOT": str(models), "REIDGEN_SHARDS_ROOT": str(shards),
               "REIDGEN_DATA": str(data_root), "REIDGEN_DEVICE": "cpu", "REIDGEN_TORCH_THREADS": "1",
               "OMP_NUM_THREADS": "1"}
        env.pop("REDIS_PASSWORD_FILE", None)
        reidgen = [sys.executable, "-m", "reidgen"]
        port = free_port()
        logs = []
        t = time.monotonic()
        for i in range(args.workers):
            logs.append(work / f"worker-{i:02d}.log")
            procs.append(subprocess.Popen(reidgen + ["worker", "--concurrency", "1", "--hostname", f"load{i}@%h",
                                                     "--loglevel", "info"],
                                          env=env, stdout=logs[-1].open("w"), stderr=subprocess.STDOUT))
        server_log = work / "serve.log"
        procs.append(subprocess.Popen(reidgen + ["serve", "--models", str(models), "--host", "127.0.0.1",
                                                 "--port", str(port), "--device", "cpu", "--jobs",
                                                 "--max-active-jobs", str(max_active),
                                                 "--header-timeout", str(args.header_timeout),
                                                 "--body-timeout", str(args.header_timeout)],
                                      env=env, stdout=server_log.open("w"), stderr=subprocess.STDOUT))
        url = f"http://127.0.0.1:{port}"
        wait_ready(logs, procs[:-1], args.ready_seconds)
        _wait_http(url, procs[-1], server_log, args.ready_seconds)
        startup_s = time.monotonic() - t
        print(f"{args.workers} workers and the server ready in {startup_s:.0f} s", flush=True)

        spec = {"kind": "dgnet_random_structures", "checkpoint": args.checkpoint, "teacher": args.teacher,
                "data": args.data,
                "subset": 1, "structures_per_image": 1, "shard_size": 1, "batch_size": 1}
        sampler = Sampler(client, queue_keys)
        baseline = sampler.sample()[1]
        sampler.start()
        run = asyncio.run(load(url, args, spec, lambda ids: job_states(client, prefix, ids)))
        sampler.stop.set()
        sampler.join()
        end_memory = sampler.sample()[1]

        accepted = run["accepted"]
        times = [t for t, _ in accepted]
        submit_s = run["t_submitted"] - run["t0"]
        jobs = len(accepted)
        per_record = (end_memory - baseline) / jobs if jobs else None
        ended_ids = [j for _, j in accepted]
        record_usage = key_bytes(client, prefix, random.Random(0).sample(ended_ids, min(50, jobs)))

        # The queue alone: the workers stopped, --queued more jobs submitted; nothing takes them.
        print(f"stopping the workers; {args.queued} jobs into the queue ...", flush=True)
        stop(procs[:-1])
        queue_before = sampler.sample()
        queued_ids = asyncio.run(submit_only(url, spec, args.jobs, args.queued, args.clients))
        queue_after = sampler.sample()
        queued = queue_after[2] - queue_before[2]
        queue_list_bytes = sum(client.memory_usage(k, samples=0) or 0 for k in queue_keys)
        queued_record_usage = key_bytes(client, prefix, queued_ids[:50])
        results = {
            "jobs_submitted": args.jobs,
            "jobs_accepted": jobs,
            "submission_seconds": round(submit_s, 2),
            "jobs_per_second_accepted": round(jobs / submit_s, 2),
            "first_to_last_accept_seconds": round(max(times) - min(times), 2) if times else None,
            "post_latency": latency_ms(run["post_s"]),
            "refused": run["refused"],
            "transport_errors": run["transport_errors"],
            "get_latency_while_submitting": latency_ms(run["get_submit_s"]),
            "get_latency_while_draining": latency_ms(run["get_drain_s"]),
            "all_ended_seconds": round(run["t_done"] - run["t0"], 2),
            "jobs_per_second_finished": round(jobs / (run["t_done"] - run["t0"]), 2),
            "final_states": run["final_states"],
            "redis": {
                "baseline_used_memory_bytes": baseline,
                "used_memory_at_end_bytes": end_memory,
                "info_bytes_per_ended_job": round(per_record, 1) if per_record is not None else None,
                "memory_usage_bytes_per_ended_job": round(record_usage, 1) if record_usage else None,
                "queued_shards": queued,
                "info_bytes_per_queued_shard": round((queue_after[1] - queue_before[1]) / queued, 1)
                if queued else None,
                "memory_usage_bytes_of_the_queue_per_shard": round(queue_list_bytes / queued, 1) if queued else None,
                "memory_usage_bytes_per_queued_job_record": round(queued_record_usage, 1)
                if queued_record_usage else None,
            },
            "startup_seconds": round(startup_s, 1),
        }
        print(json.dumps(results, indent=2), flush=True)
        command = "python bench/load_head.py " + " ".join(
            shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        write_results("load_head", {
            "command": command.strip(),
            "device": "cpu",
            "conditions": {
                "workers": args.workers, "pool_processes_per_worker": 1, "clients": args.clients,
                "pollers": args.pollers, "max_active_jobs": max_active,
                "job": {k: v for k, v in spec.items() if k not in ("checkpoint", "teacher")}
                | {"model": "DG-Net small preset, small_cnn encoder"},
                "niceness": os.nice(0),
                "redis": "local redis-server, one database, a key prefix of the run",
                "server": "reidgen serve, one uvicorn process on loopback, no API key",
                "server_header_and_body_timeout_s": args.header_timeout,
            },
            "results": results,
        }, path=Path(args.out))
    except BaseException:
        for log in (work / "serve.log", work / "worker-00.log"):
            if log.exists():
                print(f"--- {log.name}, last lines:\n{log.read_text(errors='replace')[-3000:]}", file=sys.stderr)
        raise
    finally:
        stop(procs)
        for key in client.scan_iter(f"{prefix}*"):
            client.delete(key)
        subprocess.run(["rm", "-rf", str(work)])
    return 0


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/v1/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise RuntimeError(f"the server was not ready after {timeout} s")


if __name__ == "__main__":
    sys.exit(main())
