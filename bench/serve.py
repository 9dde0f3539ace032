"""Benchmark: the generator service against the engine it wraps, on one DG-Net checkpoint.

In one run, on the same model and the same number of torch threads:

1. offline: `Engine.swap_batch` on pre-decoded real images at several batch sizes, measured
   before and after the service runs, each time in the main thread and in another thread (where
   the service's batcher runs the model); the best images/s of all is the ceiling the service is
   compared with (no HTTP, no image coding);
2. the service (`create_app` + `Engine` under uvicorn, in a child process on a loopback port)
   with dynamic batching on, at 1, 8 and 32 concurrent clients: throughput and p50/p99 latency
   of POST /v1/swap (one appearance and one structure picture from market1501_mini each,
   base64 JSON, one generated PNG back);
3. the same service with batching off (``Settings(batching=False)``), in a second child
   process, each load level run right after the batched one.

Targets (issue 5): at 32 clients, batched service ≥ 0.8 × offline, and ≥ 3 × unbatched service.
Without --models, a DG-Net (small preset, small_cnn appearance encoder) is trained for two
iterations on a symlinked subset of market1501_mini: its quality does not matter, its cost does.
Each load level is bounded by --seconds and --max-requests; the run stops by itself.

    python bench/serve.py [--models DIR] [--data market1501_mini] [--seconds 15] [--clients 1 8 32]
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable as a plain script from any directory

from bench.common import machine_info, write_results  # noqa: E402

OUT = REPO / "bench" / "results" / "serve.json"
N_IMAGES = 64  # distinct real pictures the requests cycle through


# -- the model ------------------------------------------------------------------------------------
def train_models(data: Path, root: Path) -> Path:
    """A models directory with one DG-Net run, trained like tests/test_service.py's fixture."""
    from reidgen.core.market import link_subset
    from trainer.tasks.dgnet import dgnet_preset_config, train_dgnet
    from trainer.tasks.reid import preset_config, train_reid

    # Symlinks to the first 4 identities: a short epoch for the teacher, no image copied.
    src = link_subset(data, root / "src", ids=4)
    teacher = train_reid(preset_config("tiny", data=str(src), epochs=1, workers=0, evaluate=False),
                         root / "teacher", progress=False)
    models = root / "models"
    train_dgnet(dgnet_preset_config("small", data=str(src), teacher=str(teacher), backbone="small_cnn",
                                    pretrained="none", workers=0, batch_size=4, grid_every=0, amp=False,
                                    iterations=2, checkpoint_every=10_000), models / "dgnet-small", progress=False)
    return models


def request_pictures(data: Path) -> list[bytes]:
    """Encoded real pictures (the files' own JPEG bytes), spread over the training identities."""
    files = sorted((data / "bounding_box_train").iterdir())
    return [f.read_bytes() for f in files[:: max(1, len(files) // N_IMAGES)][:N_IMAGES]]


# -- 1. offline ------------------------------------------------------------------------------------
def offline(models: Path, device: str, pictures: list[bytes], batch_sizes: list[int], seconds: float) -> dict:
    """images/s of `Engine.swap_batch` per batch size, and the per-image cost of the image coding
    the service adds (decode + resize/normalise the two inputs, PNG-encode the output)."""
    from generator_service.inference.engine import Engine
    from reidgen.core.images import decode_image_bytes, encode_image, to_pil

    engine = Engine.from_models_dir(models, device, max_batch=max(batch_sizes))
    model = engine.model_for("swap")
    n = max(batch_sizes)
    tensors = torch.stack([model.image_tensor(decode_image_bytes(p)) for p in pictures])
    idx = torch.arange(n)
    appearance, structure = tensors[idx % len(tensors)], tensors[(idx * 7 + 3) % len(tensors)]

    def measure() -> dict[str, float]:
        rates = {}
        for b in batch_sizes:
            engine.swap_batch(appearance[:b], structure[:b])  # warm-up (allocator, lazy init)
            done, start = 0, time.perf_counter()
            while True:
                out = engine.swap_batch(appearance[:b], structure[:b])
                done += len(out)
                elapsed = time.perf_counter() - start
                if elapsed >= seconds and done >= 2 * b:
                    break
            rates[str(b)] = done / elapsed
        return rates

    # The service runs the model in the engine's batcher thread, a batch worker in its main
    # thread; on a busy CPU the two differ several-fold with more than one torch thread (OpenMP
    # in the main thread waits on descheduled threads), so both are measured.
    by_context = {"main_thread": measure()}
    side: dict[str, dict] = {}
    thread = threading.Thread(target=lambda: side.setdefault("rates", measure()))
    thread.start()
    thread.join()
    by_context["other_thread"] = side["rates"]

    # What the service does per image besides the model (single thread, like one request).
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < 2.0 or count < 8:
        p, q = pictures[count % len(pictures)], pictures[(count * 7 + 3) % len(pictures)]
        a = model.image_tensor(decode_image_bytes(p))
        model.image_tensor(decode_image_bytes(q))
        base64.b64encode(encode_image(to_pil(a), "png"))
        count += 1
    coding_ms = (time.perf_counter() - start) / count * 1000
    return {"model": {"name": model.name, "identity": model.identity, "preset": model.preset,
                      "image_size": list(model.image_size), "step": model.step},
            "device": str(engine.device), "images_per_second_by_context_and_batch": by_context,
            "image_coding_ms_per_request": coding_ms}


# -- 2./3. the service -----------------------------------------------------------------------------
def serve_child(args: argparse.Namespace) -> None:
    """Run in the child process: the app on the socket the parent bound (no port race)."""
    import uvicorn

    from generator_service.http import Settings, create_app
    from generator_service.inference.engine import Engine

    torch.set_num_threads(args.threads)
    engine = Engine.from_models_dir(args.models, args.device, max_batch=args.max_batch,
                                    max_wait_ms=args.max_wait_ms, queue_size=args.queue_size)
    app = create_app(engine, Settings(batching=not args.no_batching))
    sock = socket.socket(fileno=args.child_fd)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    parent = os.getppid()

    def orphaned() -> None:
        # If the benchmark dies without stopping us (SIGKILL), stop instead of serving forever.
        while not server.should_exit:
            if os.getppid() != parent:
                server.should_exit = True
            time.sleep(1)

    threading.Thread(target=orphaned, daemon=True).start()
    server.run(sockets=[sock])


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux /proc), None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


class Service:
    """The service in a child process, started with or without batching, stopped on exit."""

    def __init__(self, args: argparse.Namespace, models: Path, batching: bool):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.ready_seconds = args.ready_seconds
        cmd = [sys.executable, __file__, "--child-fd", str(self.sock.fileno()), "--models", str(models),
               "--device", args.device, "--threads", str(args.threads), "--max-batch", str(args.max_batch),
               "--max-wait-ms", str(args.max_wait_ms), "--queue-size", str(args.queue_size)]
        self.proc = subprocess.Popen(cmd + ([] if batching else ["--no-batching"]), pass_fds=[self.sock.fileno()])

    def __enter__(self) -> Service:
        from generator_service.http.client import ServiceClient

        # Wait for readiness (models loaded, warm-up done) with a deadline, in 1 s slices so that
        # a child that dies is noticed at once rather than after the whole deadline.
        deadline = time.monotonic() + self.ready_seconds
        try:
            with ServiceClient(self.url, timeout=5) as client:
                while True:
                    try:
                        client.wait_ready(timeout=min(1.0, deadline - time.monotonic()))
                        return self
                    except TimeoutError as exc:
                        if self.proc.poll() is not None:
                            raise RuntimeError(f"the service exited (code {self.proc.returncode}) before it "
                                               f"was ready") from exc
                        if time.monotonic() >= deadline:
                            raise TimeoutError(f"the service at {self.url} was not ready within "
                                               f"{self.ready_seconds:g} s") from exc
        except BaseException:
            self.__exit__()  # `with` does not call __exit__ when __enter__ fails
            raise

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)  # uvicorn shuts down gracefully on SIGTERM
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.sock.close()


async def load(url: str, bodies: list[bytes], clients: int, seconds: float, max_requests: int) -> dict:
    """``clients`` closed-loop clients (each sends its next request when the last one returns)
    for ``seconds`` or ``max_requests``, after one unmeasured warm-up request per client."""
    import httpx

    headers = {"content-type": "application/json"}
    latencies: list[float] = []
    failures: dict[str, int] = {}
    sent = 0
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=clients)) as http:
        async def one(i: int) -> None:
            t0 = time.perf_counter()
            r = await http.post("/v1/swap", content=bodies[i % len(bodies)], headers=headers)
            if r.status_code == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                failures[str(r.status_code)] = failures.get(str(r.status_code), 0) + 1

        await asyncio.gather(*(one(i) for i in range(clients)))
        first = (await http.post("/v1/swap", content=bodies[0], headers=headers)).json()
        assert len(first["images"]) == 1, first  # a real swap came back
        latencies.clear()
        failures.clear()

        start = time.perf_counter()
        stop_at = start + seconds

        async def client() -> None:
            nonlocal sent
            while sent < max_requests and time.perf_counter() < stop_at:
                sent += 1
                await one(sent)

        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {"clients": clients, "requests_ok": len(latencies), "failures": failures, "seconds": elapsed,
            "images_per_second": len(latencies) / elapsed,
            "latency_ms_p50": float(np.percentile(ms, 50)) if len(ms) else None,
            "latency_ms_p99": float(np.percentile(ms, 99)) if len(ms) else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, help="models directory to serve (default: train a small DG-Net)")
    ap.add_argument("--data", default="market1501_mini", help="Market-style data set for the request images")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch threads, offline and in the service (default: torch's, %(default)s)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16, 32],
                    help="offline batch sizes; the best is the reference")
    ap.add_argument("--seconds", type=float, default=15.0, help="measured seconds per load level")
    ap.add_argument("--max-requests", type=int, default=2000, help="most measured requests per load level")
    ap.add_argument("--offline-seconds", type=float, default=3.0, help="measured seconds per offline batch size")
    ap.add_argument("--max-batch", type=int, default=16, help="the service's --max-batch (reidgen serve default)")
    ap.add_argument("--max-wait-ms", type=float, default=5.0, help="the service's --max-wait-ms (default)")
    ap.add_argument("--queue-size", type=int, default=64, help="the service's --queue-size (default)")
    ap.add_argument("--ready-seconds", type=float, default=120.0,
                    help="how long a service may take to load its models and warm up before the run fails")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--child-fd", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--no-batching", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_fd is not None:
        serve_child(args)
        return 0

    from reidgen.core.paths import resolve_data

    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the services are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    torch.set_num_threads(args.threads)
    data = resolve_data(args.data)
    pictures = request_pictures(data)
    bodies = [json.dumps({"appearance": [base64.b64encode(pictures[i]).decode()],
                          "structure": [base64.b64encode(pictures[(i * 7 + 3) % len(pictures)]).decode()]}).encode()
              for i in range(len(pictures))]
    t_start, load_at_start = time.perf_counter(), list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="reidgen-bench-serve-") as tmp:
        trained = args.models is None
        t0 = time.perf_counter()
        models = train_models(data, Path(tmp)) if trained else args.models
        train_s = time.perf_counter() - t0
        print(f"model: {'trained in %.0f s' % train_s if trained else models}; offline engine...", flush=True)
        before = offline(models, args.device, pictures, args.batch_sizes, args.offline_seconds)
        service: dict[str, list[dict]] = {"batched": [], "unbatched": []}
        # Both services up at once (the idle one costs nothing), each load level run on one and
        # then the other, in alternating order: a change in the machine's other load hits both
        # modes alike.
        with Service(args, models, batching=True) as batched, Service(args, models, batching=False) as unbatched:
            for i, c in enumerate(args.clients):
                pair = [("batched", batched), ("unbatched", unbatched)]
                for mode, live in (pair if i % 2 == 0 else pair[::-1]):
                    print(f"service {mode}, {c} client(s)...", flush=True)
                    server0, client0 = cpu_seconds(live.proc.pid), time.process_time()
                    result = asyncio.run(load(live.url, bodies, c, args.seconds, args.max_requests))
                    # Where the CPU goes (warm-up requests included): the clients share the machine.
                    n = max(1, result["requests_ok"] + c + 1)
                    result["cpu_ms_per_request"] = {
                        "server": (cpu_seconds(live.proc.pid) - server0) / n * 1000 if server0 is not None else None,
                        "clients": (time.process_time() - client0) / n * 1000}
                    service[mode].append(result)
        print("offline engine again...", flush=True)
        after = offline(models, args.device, pictures, args.batch_sizes, args.offline_seconds)

    # The machine is shared: a burst of other work during one offline pass would lower the
    # reference and flatter the service, so the reference is the best of both passes and both
    # threads, per batch size.
    passes = [before, after]
    rates = {b: max(p["images_per_second_by_context_and_batch"][c][b] for p in passes
                    for c in p["images_per_second_by_context_and_batch"]) for b in map(str, args.batch_sizes)}
    best_batch = max(rates, key=rates.get)
    ref = {"model": before["model"], "device": before["device"], "images_per_second_by_batch": rates,
           "best_batch": int(best_batch), "best_images_per_second": rates[best_batch],
           # batching cannot gain more than the engine itself gains from a bigger batch
           "best_over_batch_1": rates[best_batch] / rates["1"] if "1" in rates else None,
           "image_coding_ms_per_request": min(p["image_coding_ms_per_request"] for p in passes),
           "passes": [p["images_per_second_by_context_and_batch"] for p in passes]}

    by = {mode: {r["clients"]: r for r in rows} for mode, rows in service.items()}
    offline_best = ref["best_images_per_second"]
    print()
    print(f"DG-Net {ref['model']['preset']} ({'x'.join(map(str, ref['model']['image_size']))}), "
          f"POST /v1/swap with 1 pair, device {ref['device']}, {args.threads} torch threads, "
          f"service max_batch {args.max_batch}, max_wait {args.max_wait_ms:g} ms")
    for i, p in enumerate(ref["passes"]):
        for context, r in p.items():
            print(f"offline pass {i + 1}, {context.replace('_', ' ')} (images/s by batch): "
                  + ", ".join(f"{b}: {v:.1f}" for b, v in r.items()))
    print(f"offline reference: {ref['best_images_per_second']:.1f} images/s at batch {ref['best_batch']}"
          + (f" ({ref['best_over_batch_1']:.2f}x batch 1)" if ref["best_over_batch_1"] else ""))
    print(f"image coding the service adds per request (decode 2, encode 1): "
          f"{ref['image_coding_ms_per_request']:.1f} ms")
    print(f"{'clients':>7} | {'batched img/s':>13} {'p50 ms':>8} {'p99 ms':>8} | "
          f"{'unbatched img/s':>15} {'p50 ms':>8} {'p99 ms':>8} | {'batched/offline':>15} {'batched/unbatched':>17}")
    ratios = {}
    for c in args.clients:
        b, u = by["batched"][c], by["unbatched"][c]
        ratios[str(c)] = {"batched_over_offline": b["images_per_second"] / offline_best,
                          "batched_over_unbatched": b["images_per_second"] / u["images_per_second"]}
        print(f"{c:>7} | {b['images_per_second']:13.1f} {b['latency_ms_p50']:8.0f} {b['latency_ms_p99']:8.0f} | "
              f"{u['images_per_second']:15.1f} {u['latency_ms_p50']:8.0f} {u['latency_ms_p99']:8.0f} | "
              f"{ratios[str(c)]['batched_over_offline']:15.2f} {ratios[str(c)]['batched_over_unbatched']:17.2f}")
    for mode, rows in service.items():
        cpu = ", ".join(f"{r['clients']}: server {r['cpu_ms_per_request']['server'] or float('nan'):.0f} + "
                        f"clients {r['cpu_ms_per_request']['clients']:.0f}" for r in rows)
        print(f"CPU ms per request, {mode} (by clients): {cpu}")
    top = str(max(args.clients))
    targets = {"clients": int(top),
               "batched_over_offline": ratios[top]["batched_over_offline"], "batched_over_offline_target": 0.8,
               "batched_over_unbatched": ratios[top]["batched_over_unbatched"], "batched_over_unbatched_target": 3.0}
    targets["met"] = (targets["batched_over_offline"] >= 0.8 and targets["batched_over_unbatched"] >= 3.0)
    for k in ("batched_over_offline", "batched_over_unbatched"):
        ok = targets[k] >= targets[f"{k}_target"]
        print(f"target at {top} clients: {k.replace('_', ' ')} {targets[k]:.2f} (≥ {targets[f'{k}_target']}): "
              f"{'met' if ok else 'MISSED'}")
    import fastapi
    import httpx
    import uvicorn

    machine = {**machine_info(ref["device"]),
               "load_average_1_5_15min_at_start": load_at_start,
               "numpy_version": np.__version__, "fastapi_version": fastapi.__version__,
               "uvicorn_version": uvicorn.__version__, "httpx_version": httpx.__version__}
    print(f"{machine['cpus']} CPUs, load average {load_at_start[0]:.2f} at the start, "
          f"{machine['load_average_1_5_15min'][0]:.2f} at the end; total {time.perf_counter() - t_start:.0f} s")

    write_results("serve", {
        "data": str(data),
        "models": "trained by the benchmark (DG-Net small preset, small_cnn, 2 iterations)" if trained
                  else str(args.models),
        "request": "POST /v1/swap, JSON, 1 appearance + 1 structure real JPEG (base64), 1 PNG back",
        "service_settings": {"max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
                             "queue_size": args.queue_size},
        "seconds_per_level": args.seconds, "max_requests_per_level": args.max_requests,
        "offline": ref, "service": service, "ratios_by_clients": ratios, "targets": targets,
        "training_seconds": train_s if trained else None,
        "machine": machine,
    }, path=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
