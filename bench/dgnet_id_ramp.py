"""Benchmark (a short ablation): does G learn to reconstruct when L_id^c is on from the start?

The small DG-Net preset (EfficientNet-Lite0 as E_a) trains twice on market1501_mini with the
same seed, once with L_id^c on from the first iteration (the paper's schedule) and once ramped in
with λ_prim (``ramp_id_cross``, the small preset's default). It prints the mean L_img1 over each
sixth of the run and writes bench/results/dgnet_id_ramp.json.

    python bench/dgnet_id_ramp.py [--iterations 36] [--teacher RUN]   # teacher: a train-reid run on the data
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import write_results  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="market1501_mini")
    ap.add_argument("--iterations", type=int, default=36)
    ap.add_argument("--teacher", help="baseline checkpoint on --data (default: a 1-epoch small-preset one)")
    args = ap.parse_args()

    from reidgen.core.paths import resolve_data
    from trainer.runlog import read_jsonl
    from trainer.tasks.dgnet import dgnet_preset_config, train_dgnet
    from trainer.tasks.reid import preset_config, train_reid

    data = str(resolve_data(args.data))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        teacher = args.teacher or str(train_reid(preset_config("small", data=data, epochs=1, workers=0,
                                                               evaluate=False), Path(tmp) / "teacher"))
        for name, ramp in (("id_cross_from_start", False), ("id_cross_ramped", True)):
            cfg = dgnet_preset_config("small", data=data, teacher=teacher, workers=0, batch_size=4, grid_every=0,
                                      checkpoint_every=10**6, amp=False, iterations=args.iterations,
                                      feed_start=0.9, ramp_id_cross=ramp)
            train_dgnet(cfg, Path(tmp) / name, progress=False)
            losses = [r["l_img1"] for r in read_jsonl(Path(tmp) / name / "metrics.jsonl") if "l_img1" in r]
            k = max(1, len(losses) // 6)
            results[name] = [round(statistics.mean(losses[i:i + k]), 4) for i in range(0, len(losses), k)]
            print(f"{name:<22} L_img1 by sixth of the run: {results[name]}")
    write_results("dgnet_id_ramp", {"data": data, "iterations": args.iterations, "l_img1_by_sixth": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
