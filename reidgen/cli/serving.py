"""`reidgen serve | generate | worker | shards`: the service, batch jobs and their shards."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from reidgen.core.errors import ReidgenError


def _add_root_args(p: argparse.ArgumentParser, models: bool) -> None:
    """The roots of a server (serve: --models is its models root): a job names files under them only."""
    if models:
        p.add_argument("--models-root", help="a job's checkpoint and teacher are model names under this folder "
                                             "(default $REIDGEN_MODELS_ROOT or ./models)")
    p.add_argument("--data-root", help="a job's data and target are data set names under this folder "
                                       "(default $REIDGEN_DATA or ../shared/data beside the checkout)")
    p.add_argument("--shards-root", help="a job's out is a folder name under this folder "
                                         "(default $REIDGEN_SHARDS_ROOT or ./shards)")


def _load_spec(path: str):
    from pydantic import ValidationError

    from api_schemas.jobs import JobSpec

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ReidgenError(f"cannot read the job spec {path} ({exc.strerror})") from None
    try:
        return JobSpec.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "spec"
        raise ReidgenError(f"job spec {path}: {where}: {first['msg']} ({exc.error_count()} problem(s))") from None


def _follow(job_id: str) -> int:
    """A progress bar over a submitted job's shards until it ends (Ctrl-C stops watching, not the job)."""
    import time

    from tqdm import tqdm

    from worker.jobs import JobStore

    store = JobStore()
    status = store.status(job_id)
    with tqdm(total=status.records_planned, unit="img", dynamic_ncols=True, desc=f"job {job_id[:8]}") as bar:
        while True:
            status = store.status(job_id)
            bar.update(status.records_done + status.records_failed - bar.n)
            bar.set_postfix(shards=f"{status.shards_done}/{status.shards_total}", state=status.state)
            if status.state in ("done", "failed", "cancelled"):
                break
            time.sleep(1.0)
    for error in status.errors:
        print(f"error: {error}", file=sys.stderr)
    return 0 if status.state == "done" else 1


def cmd_serve(args: argparse.Namespace) -> int:
    from generator_service.http.serve import serve
    from reidgen.core.settings import WorkerSettings

    jobs = None
    if args.jobs if args.jobs is not None else WorkerSettings.from_env().redis_url_is_set:
        from worker.jobs import CeleryJobs

        jobs = CeleryJobs()
    serve(args.models, jobs=jobs, host=args.host, port=args.port, api_key_file=args.api_key_file, device=args.device,
          max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, queue_size=args.queue_size,
          batching=not args.no_batching, max_images=args.max_images, max_pixels=args.max_pixels,
          request_timeout_s=args.timeout, mask_provider=args.masks, data_root=args.data_root,
          shards_root=args.shards_root, max_job_records=args.max_job_records, max_job_tasks=args.max_job_tasks,
          min_shard_size=args.min_shard_size, max_active_jobs=args.max_active_jobs,
          header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout, keep_alive_s=args.keep_alive,
          max_connections=args.max_connections)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    spec = _load_spec(args.spec)
    if args.submit:
        from api_schemas.jobs import JobRequest
        from worker.jobs import submit_job

        job_id = submit_job(JobRequest(spec=spec, out=str(Path(args.out).resolve())))
        print(f"job {job_id} submitted ({args.out}); follow it with GET /v1/jobs/{job_id}")
        return _follow(job_id) if args.follow else 0
    from worker.run import run_job
    from worker.shards import verify

    results = run_job(spec, args.out, device=args.device, progress=not args.no_progress)
    made = sum(r.records for r in results if r.status == "done")
    failed = sum(r.failed for r in results)
    skipped = sum(r.status == "skipped" for r in results)
    print(f"{len(results)} shard(s) in {args.out}: {made} records written, {skipped} shard(s) already done, "
          f"{failed} record(s) failed")
    report = verify(args.out)
    print(report.summary().splitlines()[-1] if report.ok else report.summary())
    return 0 if report.ok else 1


def cmd_worker(args: argparse.Namespace) -> int:
    from generator_service.http import Settings
    from reidgen.core.settings import WorkerSettings
    from worker.celery_app import app, queue_name, redo_queue_name, use_settings

    # The flags over the environment, installed before the pool forks: every pool process has them.
    settings = WorkerSettings.from_env(device=args.device, torch_threads=args.threads, queue=args.queue,
                                       models_root=args.models_root, data_root=args.data_root,
                                       shards_root=args.shards_root, heartbeat_s=args.heartbeat, lease_s=args.lease)
    Settings.from_env(worker=settings)  # bad timings fail here, in one line, not in every task
    use_settings(settings)

    argv = ["worker", "--loglevel", args.loglevel, "--concurrency", str(args.concurrency), "--pool", "prefork",
            "--queues", f"{queue_name()},{redo_queue_name()}", "--without-gossip", "--without-mingle"]
    if args.hostname:
        argv += ["--hostname", args.hostname]
    app.worker_main(argv)
    return 0


def cmd_shards(args: argparse.Namespace) -> int:
    from worker.shards import ShardReader, contact_sheet, shard_paths, verify

    if args.action == "verify":
        report = verify(args.dir)
        print(report.summary())
        return 0 if report.ok else 1
    paths = shard_paths(args.dir)
    if not paths:
        raise ReidgenError(f"no finished shards under {args.dir}")
    total = 0
    for path in paths:
        m = ShardReader(path).manifest
        total += m.record_count
        print(f"{path.name}: {m.record_count} records, {len(m.failed)} failed, sha256 {m.shard_sha256[:16]}, "
              f"plan {m.plan_hash}, written on {m.host or '(not recorded)'}")
    m = ShardReader(paths[0]).manifest
    meta, _ = ShardReader(paths[0]).record(0) if m.record_count else ({}, b"")
    print(f"{len(paths)} shard(s), {total} records; kind {m.spec.kind}, encoding {m.spec.encoding}, "
          f"models {', '.join(f'{k} {v.identity}' for k, v in m.models.items())}")
    if meta:
        print(f"first record: {json.dumps(meta)}")
    sheet = Path(args.sheet) if args.sheet else Path(args.dir) / "contact_sheet.png"
    contact_sheet(args.dir, count=args.count).save(sheet)
    print(f"contact sheet: {sheet}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="HTTP service: swap, render, interpolate (FastAPI, dynamic batching)",
                       description="Serve the DG-Net and CR-GAN checkpoints of a models folder (NAME.pt files or run "
                                   "folders) over HTTP: /v1/swap, /v1/render, /v1/interpolate, /v1/models, "
                                   "/v1/healthz, /v1/readyz, /v1/metrics; OpenAPI at /docs. Binds 127.0.0.1 unless "
                                   "--host says otherwise. With an API key (--api-key-file or $REIDGEN_API_KEY) every "
                                   "endpoint but health and readiness requires it (X-API-Key or Authorization: "
                                   "Bearer).")
    p.add_argument("--models", "--models-root", dest="models", required=True,
                   help="folder of checkpoints or run folders: the models served, and the models root a job's "
                        "checkpoint and teacher are named under")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-file", help="file whose first line is the API key")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-batch", type=int, default=16, help="most images per model call")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    p.add_argument("--queue-size", type=int, default=256,
                   help="images waiting for the device before 503 + Retry-After (checked before a body is read)")
    p.add_argument("--no-batching", action="store_true", help="run every request alone (for comparison)")
    p.add_argument("--max-images", type=int, default=16, help="images per request")
    p.add_argument("--max-pixels", type=int, default=1024 * 1024, help="pixels per input image")
    p.add_argument("--timeout", type=float,
                   help="per-request deadline in seconds (default $REIDGEN_REQUEST_TIMEOUT_S or 30)")
    p.add_argument("--masks", choices=["pose", "selfie", "geometric"],
                   help="person masks of /v1/render's target images (default: what the CR-GAN was trained with)")
    p.add_argument("--jobs", action=argparse.BooleanOptionalAction, default=None,
                   help="serve /v1/jobs, queueing batch generation on the Celery workers at $REDIS_URL "
                        "(default: on when REDIS_URL is set)")
    _add_root_args(p, models=False)
    g = p.add_argument_group("job bounds")
    g.add_argument("--max-job-records", type=int, help="records per job (default 2000000)")
    g.add_argument("--max-job-tasks", type=int, help="shards (tasks) per job (default 10000)")
    g.add_argument("--min-shard-size", type=int, help="records per shard of a job of several shards (default 64)")
    g.add_argument("--max-active-jobs", type=int, help="jobs queued or running at once; more get 429 (default 16)")
    g = p.add_argument_group("connections")
    g.add_argument("--header-timeout", type=float, help="seconds for a request's head to arrive (default 10)")
    g.add_argument("--body-timeout", type=float, help="seconds for its body to arrive after the head (default 60)")
    g.add_argument("--keep-alive", type=float, help="seconds an idle kept-alive connection stays open (default 5)")
    g.add_argument("--max-connections", type=int, help="open connections at once; more are closed (default 256)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("generate", help="batch generation into LMDB shards (in-process, or --submit to Celery)",
                       description="Run a batch generation job: the job spec (JSON; see api_schemas/jobs.py JobSpec) "
                                   "names the checkpoint, the data, the kind of generation, the seed, the shard size "
                                   "and the encoding. By default every shard is made in this process, no broker "
                                   "needed; finished shards are skipped, so an interrupted run continues where it "
                                   "stopped. --submit sends the job to the Celery workers ($REDIS_URL) instead.")
    p.add_argument("spec", help="job spec JSON file")
    p.add_argument("--out", required=True, help="output folder (job.json and shard-NNNNN/ folders)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--submit", action="store_true", help="queue one Celery task per shard and return the job id")
    p.add_argument("--follow", action="store_true", help="with --submit: show the job's progress until it ends")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("worker", help="a Celery worker making shards of queued jobs (Redis at $REDIS_URL)",
                       description="Run a Celery worker for batch generation jobs. Each pool process loads its "
                                   "model once, on its first shard. Run one worker per GPU (e.g. "
                                   "CUDA_VISIBLE_DEVICES=1 reidgen worker). Broker: $REDIS_URL (default "
                                   "redis://127.0.0.1:6379/0); keys are prefixed with $REIDGEN_REDIS_PREFIX.")
    p.add_argument("--concurrency", type=int, default=1, help="pool processes (1 per GPU)")
    p.add_argument("--queue", help="queue name (default $REIDGEN_QUEUE or reidgen-shards)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1 ...")
    p.add_argument("--threads", type=int, help="torch threads per pool process")
    p.add_argument("--hostname", help="Celery node name (default celery@HOST)")
    _add_root_args(p, models=True)
    p.add_argument("--heartbeat", type=float,
                   help="seconds between a running shard's lease renewals (default $REIDGEN_HEARTBEAT_S or 10)")
    p.add_argument("--lease", type=float,
                   help="seconds without a renewal after which a shard's worker counts as lost and the shard is "
                        "queued again (default $REIDGEN_LEASE_S or 30)")
    p.add_argument("--loglevel", default="info")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("shards", help="verify or inspect generated shards",
                       description="verify: check every record against the manifests' checksums and job.json "
                                   "(missing shards, duplicates, corruption; exit 1 if anything is wrong). "
                                   "inspect: per-shard counts and checksums, the first record's labels, and a "
                                   "contact sheet PNG of records.")
    p.add_argument("action", choices=["verify", "inspect"])
    p.add_argument("dir", help="a job's output folder or one shard folder")
    p.add_argument("--sheet", help="contact sheet PNG (default DIR/contact_sheet.png)")
    p.add_argument("--count", type=int, default=32, help="records on the contact sheet")
    p.set_defaults(func=cmd_shards)
