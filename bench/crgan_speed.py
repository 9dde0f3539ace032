"""Benchmark: CR-GAN training iterations per second and peak memory, small vs paper preset.

Each preset trains in its own subprocess (so peak memory is that preset's own) on real images
(source market1501_mini, target cuhk03_mini). D_id is a baseline re-id model of the matching
preset trained for one step on the spot: its weights do not change the cost of an iteration,
its architecture does (EfficientNet-Lite0 at 128×64 for small, ResNet-50 at 256×128 for
paper). Masks come from the geometric prior, computed before the clock starts (a real run
caches its masks once). The run is split in two equal halves, as the schedule is: G is updated
once per iteration in the first half and twice in the second, so both rates are reported.

    python bench/crgan_speed.py [--iters 6] [--presets small paper]   (CPU default: small only)
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


def rate(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")


def child(preset: str, source: str, target: str, iters: int, warmup: int, id_model: str, out: str) -> None:
    import torch

    from trainer.runlog import read_jsonl
    from trainer.tasks.crgan import crgan_preset_config, train_crgan

    half = warmup + iters
    cfg = crgan_preset_config(preset, source=source, target=target, id_model=id_model, masks="geometric",
                              iterations=2 * half, cam_epochs=1, workers=1, grid_every=0, checkpoint_every=10**9)
    start = time.perf_counter()
    train_crgan(cfg, out, progress=False)
    wall = time.perf_counter() - start
    times = [r["time"] for r in read_jsonl(Path(out) / "metrics.jsonl") if "l_con" in r]
    first, second = times[warmup:half], times[half + warmup:]
    print(json.dumps({
        "preset": preset, "image_size": list(cfg.model.image_size), "batch_size": cfg.batch_size,
        "iterations_per_second_first_half": rate(first), "iterations_per_second_second_half": rate(second),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "wall_seconds": wall,
        "torch_threads": torch.get_num_threads()}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="market1501_mini")
    ap.add_argument("--target", default="cuhk03_mini")
    ap.add_argument("--iters", type=int, default=6, help="measured iterations per half")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured iterations at the start of each half")
    ap.add_argument("--presets", nargs="+", choices=["small", "paper"],
                    help="default: small and paper on a GPU; small alone on the CPU, where one paper "
                         "iteration takes about two minutes")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--id-model", help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()

    from reidgen.core.device import pick_device
    from reidgen.core.paths import resolve_data

    source, target = str(resolve_data(args.source)), str(resolve_data(args.target))
    device = pick_device("auto")  # where the children train (their configs say "auto")
    if not args.presets:
        args.presets = ["small", "paper"] if device.type == "cuda" else ["small"]
    if args.child:
        child(args.child, source, target, args.iters, args.warmup, args.id_model, args.out_dir)
        return 0

    from trainer.tasks.reid import preset_config, train_reid

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            id_model = train_reid(preset_config(preset, data=source, max_steps=1, workers=0, evaluate=False,
                                                pretrained="none"), Path(tmp) / f"id-{preset}", progress=False)
            results.append(run_child(__file__, "--child", preset, "--source", source, "--target", target,
                                     "--iters", str(args.iters), "--warmup", str(args.warmup),
                                     "--id-model", str(id_model), "--out-dir", str(Path(tmp) / preset)))

    print(f"CR-GAN training speed on {os.cpu_count()} CPU(s), {args.iters} measured iterations per half")
    print(f"{'preset':<8} {'image':<9} {'batch':>5} {'it/s (G×1)':>11} {'it/s (G×2)':>11} {'peak RSS':>10}")
    for r in results:
        print(f"{r['preset']:<8} {'×'.join(map(str, r['image_size'])):<9} {r['batch_size']:>5} "
              f"{r['iterations_per_second_first_half']:11.3f} {r['iterations_per_second_second_half']:11.3f} "
              f"{r['peak_rss_mb']:8.0f} MB")
    write_results("crgan_speed", {"device": str(device), "source": source, "target": target,
                                  "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
