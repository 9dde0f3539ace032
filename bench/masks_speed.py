"""Benchmark: person masks per second for each provider, on the same real crops in one run.

    python bench/masks_speed.py [--data market1501_mini] [--images 200] [--threads 1 2]

The TFLite models run one image at a time (their interpreter is single-image); the geometric
prior needs no model. Writes bench/results/masks_speed.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import write_results  # noqa: E402
from generator_service.models.masks import build_mask_provider  # noqa: E402
from reidgen.core.market import scan_split  # noqa: E402
from reidgen.core.paths import resolve_data  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="market1501_mini")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    paths = [it.path for it in scan_split(resolve_data(args.data), "train")[: args.images]]

    rows = []
    setups = [("geometric", {}, None)] + [(k, {"num_threads": t}, t) for k in ("pose", "selfie") for t in args.threads]
    for kind, opts, threads in setups:
        provider = build_mask_provider(kind, **opts)
        provider.masks(paths[:5])  # warm-up
        start = time.perf_counter()
        masks = provider.masks(paths)
        seconds = time.perf_counter() - start
        coverage = sum(float((m >= 0.5).mean()) for m in masks) / len(masks)
        rows.append({"provider": kind, "threads": threads, "images": len(paths), "seconds": seconds,
                     "masks_per_second": len(paths) / seconds, "mean_person_share": coverage})

    print(f"person masks on {len(paths)} real crops of {args.data}, {os.cpu_count()} CPU(s)")
    print(f"{'provider':<10} {'threads':>7} {'masks/s':>9} {'ms/mask':>8} {'person share':>13}")
    for r in rows:
        print(f"{r['provider']:<10} {r['threads'] or '-':>7} {r['masks_per_second']:9.1f} "
              f"{1000 / r['masks_per_second']:8.2f} {r['mean_person_share']:13.2f}")
    write_results("masks_speed", {"device": "cpu", "data": args.data, "results": rows})  # TFLite runs on the CPU
    return 0


if __name__ == "__main__":
    sys.exit(main())
