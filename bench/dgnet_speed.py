"""Benchmark: DG-Net training iterations per second and peak memory, paper vs small preset.

Each preset trains in its own subprocess (so peak memory is that preset's own) on real
Market-1501 images for a few warm-up iterations plus measured ones, with a teacher made on the
spot (a tiny baseline: its quality does not change the cost of an iteration). Feeding is on
from the start, so every loss of the full iteration is paid for.

Each preset runs in fp32 and in bf16 autocast (on the CPU: `cpu_bf16`, which pays only on CPUs with
native bf16 such as AVX512-BF16), side by side in one run.

    python bench/dgnet_speed.py [--data market1501_mini] [--iters 6] [--presets small paper]
                                [--precisions fp32 bf16] [--threads N] [--batch-sizes 4 6 8]

``--arms`` measures the small preset with each fast-convergence lever of `bench/dgnet_fast.py`
instead (the cost side of issue 22's arms; an arm's CPU-minutes are its iterations × these
seconds): ``python bench/dgnet_speed.py --arms --threads 1 --precisions fp32
--results dgnet_speed_arms``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import run_child, write_results  # noqa: E402


def child(preset: str, precision: str, data: str, iters: int, warmup: int, teacher: str, out: str,
          threads: int, arm: str = "", layout: str = "default", batch: int = 0) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from bench.dgnet_fast import ARMS
    from trainer.runlog import read_jsonl
    from trainer.tasks.dgnet import DGNetTrainer, dgnet_preset_config, train_dgnet

    if layout == "contiguous":  # the layout DG-Net trained in on the CPU before channels_last
        DGNetTrainer.channels_last_on_cpu = False

    # No pretrained weights: ResNet-50's are not obtainable offline and do not change the cost.
    cfg = dgnet_preset_config(preset, data=data, teacher=teacher, pretrained="none", iterations=warmup + iters,
                              feed_start=0.0, ramp=0.01, workers=1, grid_every=0, checkpoint_every=10**9,
                              quality_every=0, ea_from_teacher=False, amp=precision == "bf16",
                              cpu_bf16=precision == "bf16", **(ARMS[arm] if arm else {}),
                              **({"batch_size": batch} if batch else {}))
    start = time.perf_counter()
    train_dgnet(cfg, out, progress=False)
    wall = time.perf_counter() - start
    times = [r["time"] for r in read_jsonl(Path(out) / "metrics.jsonl") if "l_img1" in r]
    measured = times[warmup:]
    rate = (len(measured) - 1) / (measured[-1] - measured[0]) if len(measured) > 1 else float("nan")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"preset": preset, "precision": precision, "arm": arm or None, "layout": layout,
                      "settings": ARMS[arm] if arm else {}, "iterations_per_second": rate,
                      "seconds_per_iteration": 1 / rate,
                      "peak_rss_mb": peak_mb, "wall_seconds": wall, "batch_per_loader": cfg.batch_size,
                      "image_size": list(cfg.model.image_size), "backbone": cfg.model.backbone,
                      "torch_threads": torch.get_num_threads()}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="market1501_mini")
    ap.add_argument("--iters", type=int, default=6, help="measured iterations per preset")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--presets", nargs="+", default=["small", "paper"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads per child (0: torch's default)")
    ap.add_argument("--arms", nargs="*", metavar="ARM",
                    help="measure these arms of bench/dgnet_fast.py on the small preset (all when none is named)")
    ap.add_argument("--layouts", nargs="+", default=["default"], choices=["default", "contiguous"],
                    help="memory layouts: default (channels_last on the CPU where the trainer chooses it) and/or "
                         "contiguous (NCHW), side by side")
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[0], metavar="N",
                    help="images per loader, side by side (0: the preset's own, 8)")
    ap.add_argument("--results", default="dgnet_speed", help="name of the JSON under bench/results/")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--teacher", help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()

    from reidgen.core.paths import resolve_data

    data = str(resolve_data(args.data))
    if args.child:
        preset, precision, arm, layout, batch = args.child.split(":")
        child(preset, precision, data, args.iters, args.warmup, args.teacher, args.out_dir, args.threads, arm,
              layout, int(batch))
        return 0
    if args.arms is not None:
        from bench.dgnet_fast import ARMS

        unknown = sorted(set(args.arms) - set(ARMS))
        if unknown:
            ap.error(f"unknown arm(s) {', '.join(unknown)}; expected some of {', '.join(ARMS)}")
        runs = [("small", arm) for arm in (args.arms or ARMS)]
    else:
        runs = [(preset, "") for preset in args.presets]

    from trainer.tasks.reid import preset_config, train_reid

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        teacher = str(train_reid(preset_config("tiny", data=data, max_steps=1, workers=0, evaluate=False),
                                 Path(tmp) / "teacher", progress=False))
        for preset, arm in runs:
            for precision in args.precisions:
                for layout in args.layouts:
                    for batch in args.batch_sizes:
                        results.append(run_child(
                            __file__, "--child", f"{preset}:{precision}:{arm}:{layout}:{batch}", "--data", data,
                            "--iters", str(args.iters), "--warmup", str(args.warmup), "--teacher", teacher,
                            "--threads", str(args.threads),
                            "--out-dir", str(Path(tmp) / f"{preset}_{precision}_{arm}_{layout}_{batch}")))

    print(f"DG-Net training speed on {os.cpu_count()} CPU(s), {args.iters} measured iterations each")
    print(f"{'preset':<8} {'arm':<10} {'precision':<9} {'layout':<10} {'batch':>5} {'backbone':<20} {'image':<9} "
          f"{'it/s':>7} {'s/it':>7} {'peak RSS':>10}")
    for r in results:
        print(f"{r['preset']:<8} {r['arm'] or '':<10} {r['precision']:<9} {r['layout']:<10} {r['batch_per_loader']:>5} "
              f"{r['backbone']:<20} {'×'.join(map(str, r['image_size'])):<9} "
              f"{r['iterations_per_second']:7.3f} {r['seconds_per_iteration']:7.2f} {r['peak_rss_mb']:8.0f} MB")
    layout_gain = {}
    for r in results:
        if r["layout"] == "contiguous":
            same = [d for d in results if d["layout"] == "default" and
                    (d["preset"], d["precision"], d["arm"], d["batch_per_loader"]) ==
                    (r["preset"], r["precision"], r["arm"], r["batch_per_loader"])]
            if same:
                key = ":".join(filter(None, (r["preset"], r["arm"], r["precision"])))
                layout_gain[key] = r["seconds_per_iteration"] / same[0]["seconds_per_iteration"]
                print(f"{key}: the default layout is {layout_gain[key]:.2f}× as fast as contiguous")
    # Speed-ups compare like with like: the same batch (named in the key when several were measured).
    batches = sorted({r["batch_per_loader"] for r in results})
    by = {(r["preset"], r["precision"], r["batch_per_loader"]): r for r in results
          if not r["arm"] and r["layout"] == "default"}
    by = {(preset + (f" batch {b}" if len(batches) > 1 else ""), precision): r
          for (preset, precision, b), r in by.items()}
    ratio = None
    if ("small", "fp32") in by and ("paper", "fp32") in by:
        ratio = by["small", "fp32"]["iterations_per_second"] / by["paper", "fp32"]["iterations_per_second"]
        print(f"small preset is {ratio:.1f}× faster per iteration than the paper preset (fp32)")
    bf16_speedup = {}
    for preset in sorted({name for name, _ in by}):
        if (preset, "fp32") in by and (preset, "bf16") in by:
            fp32, bf16 = by[preset, "fp32"], by[preset, "bf16"]
            bf16_speedup[preset] = bf16["iterations_per_second"] / fp32["iterations_per_second"]
            print(f"{preset}: bf16 autocast is {bf16_speedup[preset]:.2f}× the fp32 speed")
    # The children train on the config's default device, "auto": the one pick_device resolves here.
    from reidgen.core.device import pick_device

    if args.arms is not None:
        base = {r["precision"]: r for r in results if r["arm"] == "small" and r["layout"] == "default"}
        for r in results:
            if r["precision"] in base:
                r["cost_over_small"] = r["seconds_per_iteration"] / base[r["precision"]]["seconds_per_iteration"]
                print(f"{r['arm']} ({r['precision']}): {r['cost_over_small']:.2f}× the small preset's s/it")
    # The data set as named (not this checkout's resolved path) and the command, for the results page.
    write_results(args.results, {"device": str(pick_device("auto")), "data": args.data, "results": results,
                                  "commands": ["python bench/dgnet_speed.py " + " ".join(sys.argv[1:])],
                                  "small_over_paper_speed": ratio, "bf16_over_fp32_speed": bf16_speedup,
                                  "default_layout_over_contiguous_speed": layout_gain,
                                  "torch_threads": args.threads or None})
    return 0


if __name__ == "__main__":
    sys.exit(main())
