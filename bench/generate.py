"""Benchmark: images/s of a batch generation job versus the generator's raw forward throughput
at the same batch size, measured side by side in one run (target: job / raw ≥ 0.85).

"Raw" is `Engine.swap_batch` on batches already in memory, repeated: no decoding, no labels, no
encoding, no LMDB. The job is `worker.run.generate_shard` over every shard of a spec (decode →
engine → encode → LMDB, pipelined), with the model already loaded as in a warm worker. Both
are measured with and without the teacher's soft labels, so the pipelining overhead and the
cost of the soft labels are reported separately. The job runs in its default pipeline (I/O
threads overlapped with the device; inline on a CPU device), and the other pipeline is measured
beside it.

The DG-Net checkpoint is made on the spot (1 iteration of the chosen preset, random weights:
the cost of a forward pass does not depend on the weights), or given with --checkpoint.

    python bench/generate.py [--data market1501_mini] [--preset small] [--batch 16] [--records 320]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import write_results  # noqa: E402


def make_checkpoint(data: str, preset: str, root: Path) -> str:
    from trainer.tasks.dgnet import dgnet_preset_config, train_dgnet
    from trainer.tasks.reid import preset_config, train_reid

    teacher = train_reid(preset_config("tiny", data=data, max_steps=1, workers=0, evaluate=False),
                         root / "teacher", progress=False)
    return str(train_dgnet(dgnet_preset_config(preset, data=data, teacher=str(teacher), pretrained="none",
                                               iterations=1, workers=0, batch_size=4, grid_every=0,
                                               checkpoint_every=10**9), root / "dgnet", progress=False))


def raw_throughput(runtime, plan, batch: int, seconds: float, teacher: bool) -> float:
    """Images/s of the engine (and optionally the teacher) on the job's own first batches,
    decoded beforehand and kept in memory, run over and over."""
    from worker.run import _load_batch, _ShardPairs, synthesize

    records = range(min(4 * batch, plan.records))  # the plan's first records
    pairs = _ShardPairs(plan, records)
    batches = [_load_batch(plan, pairs, runtime.model, list(records[i:i + batch]))
               for i in range(0, len(records), batch)]
    synthesizer = runtime.synthesizer
    saved, synthesizer.teacher = synthesizer.teacher, (synthesizer.teacher if teacher else None)
    try:
        for b in batches[:3]:  # warm-up: the first calls on CPU pay for oneDNN primitive creation
            synthesize(runtime, b.appearance, b.structure, None, 10)
        n, k, start = 0, 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            b = batches[k % len(batches)]
            synthesize(runtime, b.appearance, b.structure, None, 10)
            n, k = n + len(b.indices), k + 1
        return n / (time.perf_counter() - start)
    finally:
        synthesizer.teacher = saved


def job_throughput(spec, runtime, out: Path, overlap: bool) -> tuple[float, int]:
    from worker.plans import make_plan
    from worker.run import generate_shard

    plan = make_plan(spec)
    shutil.rmtree(out, ignore_errors=True)
    generate_shard(spec, 0, out / "warm", runtime, overlap=overlap)  # warm-up: pools, allocator, first batches
    start = time.perf_counter()
    records = sum(generate_shard(spec, i, out / "run", runtime, loader_threads=2, encoder_threads=2,
                                 overlap=overlap).records for i in range(plan.shards))
    return records / (time.perf_counter() - start), records


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="market1501_mini")
    ap.add_argument("--preset", default="small", choices=["small", "paper"])
    ap.add_argument("--checkpoint", help="an existing DG-Net checkpoint (its teacher must be findable)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--records", type=int, default=320, help="records of the measured job")
    ap.add_argument("--shard-size", type=int, default=160)
    ap.add_argument("--encoding", default="jpeg", choices=["png", "jpeg"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--raw-seconds", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved raw/job measurements (medians reported)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, help="the JSON (default: bench/results/generate.json)")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from api_schemas.jobs import JobSpec
    from reidgen.core.paths import resolve_data
    from worker.plans import make_plan
    from worker.run import load_runtime

    data = str(resolve_data(args.data))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        checkpoint = args.checkpoint or make_checkpoint(data, args.preset, root)
        k = 4
        base = dict(kind="dgnet_random_structures", checkpoint=checkpoint, data=data, subset=args.records // k,
                    structures_per_image=k, shard_size=args.shard_size, batch_size=args.batch,
                    encoding=args.encoding, seed=0)
        # Interleaved rounds, medians: on a shared machine the load changes from minute to minute,
        # and a ratio of two figures taken minutes apart would measure that instead.
        for soft in (False, True):
            spec = JobSpec(**base, soft_labels=soft)
            runtime = load_runtime(spec, args.device)
            plan = make_plan(spec)
            # The job's default pipeline overlaps I/O threads with the device unless the device is
            # the CPU; the other mode is measured beside it to show why that is the default.
            default_overlap = runtime.engine.device.type != "cpu"
            raws, jobs, others = [], [], []
            for _ in range(args.rounds):
                raws.append(raw_throughput(runtime, plan, args.batch, args.raw_seconds, teacher=soft))
                job, records = job_throughput(spec, runtime, root / f"out-{soft}", default_overlap)
                jobs.append(job)
                others.append(job_throughput(spec, runtime, root / f"out-{soft}", not default_overlap)[0])
            raw, job, other = statistics.median(raws), statistics.median(jobs), statistics.median(others)
            name = "with_soft_labels" if soft else "generator_only"
            mode, other_mode = ("overlapped", "inline") if default_overlap else ("inline", "overlapped")
            results[name] = {"raw_images_per_s": raw, "job_images_per_s": job, "job_over_raw": job / raw,
                             "job_pipeline": mode, "records_per_job": records, "raw_rounds": raws,
                             "job_rounds": jobs, f"{other_mode}_job_images_per_s": other,
                             f"{other_mode}_job_over_raw": other / raw, f"{other_mode}_job_rounds": others}
            print(f"{name:<17} raw forward {raw:6.1f} img/s   job ({mode}) {job:6.1f} img/s = {job / raw:.3f}×   "
                  f"[{other_mode}: {other:6.1f} img/s = {other / raw:.3f}×]  (medians of {args.rounds} rounds)")
        device = str(runtime.engine.device)
    write_results("generate", {
        "device": device, "data": data, "preset": args.preset if not args.checkpoint else "given",
        "batch_size": args.batch, "encoding": args.encoding, "shard_size": args.shard_size, "rounds": args.rounds,
        "target_job_over_raw": 0.85, "results": results,
    }, path=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
