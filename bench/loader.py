"""Benchmark: the shard data set against image files, and how long training waits for data.

1. Images/s of `trainer.feeds.shards.ShardDataset` (LMDB, opened per DataLoader worker) versus
   `trainer.feeds.data.ImageDataset` reading the very same encoded images from JPEG files, with the
   same decode + training transform, DataLoader workers and batch size; interleaved rounds,
   medians reported.
2. The share of a training step spent waiting for data in `reidgen train-reid --real ...
   --shards ...` (the trainer logs ``data_wait_s`` and ``step_s`` per step; target ≤ 5 %).

Everything is made on the spot from real images (symlinked, never copied): a tiny teacher and
DG-Net (a few iterations: the loader does not care about image quality) and a job's shards.

    python bench/loader.py [--data market1501_mini] [--ids 12] [--records 640] [--workers 2]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import write_results  # noqa: E402


def loader_rate(dataset, batch: int, workers: int, epochs: int) -> float:
    import torch
    from torch.utils.data import DataLoader

    from trainer.feeds.samplers import RandomBatchSampler

    sampler = RandomBatchSampler(len(dataset), batch, seed=0)
    n, start = 0, time.perf_counter()
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                            generator=torch.Generator().manual_seed(0))
        for b in loader:
            n += len(b[0])
    return n / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="market1501_mini")
    ap.add_argument("--ids", type=int, default=12, help="identities of the real training subset")
    ap.add_argument("--records", type=int, default=640, help="synthetic records to generate")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2, help="epochs per loader measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--train-preset", default="small", choices=["small", "tiny"],
                    help="re-id model of the data-wait measurement (small: EfficientNet-Lite0, the CPU default)")
    ap.add_argument("--train-steps", type=int, default=24)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    import torch

    from api_schemas.jobs import JobSpec
    from reidgen.cli import main as cli
    from reidgen.core.market import Item, LabelMap, link_subset, scan_split
    from reidgen.core.paths import resolve_data
    from trainer.feeds.data import ImageDataset
    from trainer.feeds.shards import ShardDataset
    from trainer.feeds.transforms import train_transform
    from trainer.runlog import read_jsonl
    from trainer.tasks.dgnet import dgnet_preset_config, train_dgnet
    from trainer.tasks.reid import preset_config, train_reid
    from worker.run import run_job
    from worker.shards import ShardReader, shard_paths

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = link_subset(resolve_data(args.data), root / "data", args.ids, splits=("train",))
        label_map = LabelMap.from_items(scan_split(data, "train"))
        teacher = train_reid(preset_config("tiny", data=str(data), max_steps=2, workers=0, evaluate=False),
                             root / "teacher", progress=False)
        dgnet = train_dgnet(dgnet_preset_config("small", data=str(data), teacher=str(teacher), backbone="small_cnn",
                                                pretrained="none", iterations=1, workers=0, batch_size=4,
                                                grid_every=0, checkpoint_every=10**9), root / "dgnet", progress=False)
        n_images = len(scan_split(data, "train"))
        k = max(1, -(-args.records // n_images))
        spec = JobSpec(kind="dgnet_random_structures", checkpoint=str(dgnet), data=str(data),
                       structures_per_image=k, shard_size=256, batch_size=32, encoding="jpeg", seed=0)
        shards = root / "shards"
        started = time.perf_counter()
        run_job(spec, shards, device=args.device, progress=False)
        generation_s = time.perf_counter() - started

        # The same encoded images as JPEG files, named so the Market reader parses them.
        files = root / "files"
        files.mkdir()
        items = []
        for path in shard_paths(shards):
            reader = ShardReader(path)
            for i, entry in enumerate(reader.manifest.records):
                meta, image = reader.record(i)
                f = files / f"{meta['appearance']['pid']:04d}_c1s1_{entry.index:06d}_00.jpg"
                f.write_bytes(image)
                items.append(Item(str(f), meta["appearance"]["pid"], 1))
        size = (128, 64)
        transform = train_transform(size, erasing_p=0.5)
        from_shards = ShardDataset([shards], transform, label_map, size)
        from_files = ImageDataset(items, transform, label_map, size)
        rates: dict[str, list[float]] = {"shards": [], "jpeg_files": []}
        for _ in range(args.rounds):
            rates["shards"].append(loader_rate(from_shards, args.batch, args.workers, args.epochs))
            rates["jpeg_files"].append(loader_rate(from_files, args.batch, args.workers, args.epochs))
        shard_rate, file_rate = statistics.median(rates["shards"]), statistics.median(rates["jpeg_files"])
        print(f"loader: shards {shard_rate:.0f} img/s, JPEG files {file_rate:.0f} img/s "
              f"(ratio {shard_rate / file_rate:.2f}; {len(from_shards)} images, {args.workers} workers)")

        run = root / "train"
        rc = cli(["train-reid", "--real", str(data), "--shards", str(shards), "--preset", args.train_preset,
                  "--pretrained", "none", "--out", str(run), "--max-steps", str(args.train_steps),
                  "--batch-size", str(args.batch), "--workers", str(args.workers), "--no-eval",
                  "--device", args.device])
        if rc != 0:
            return rc
        steps = [r for r in read_jsonl(run / "metrics.jsonl") if "data_wait_s" in r][3:]  # after warm-up
        wait, total = sum(r["data_wait_s"] for r in steps), sum(r["step_s"] for r in steps)
        share = wait / total
        print(f"train-reid --shards ({args.train_preset} preset, {args.batch} real + {args.batch} synthetic per "
              f"step): {share:.1%} of a step waiting for data over {len(steps)} steps "
              f"({total / len(steps):.2f} s/step)")
        device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"

    write_results("loader", {
        "device": device, "data": args.data, "ids": args.ids, "records": len(from_shards), "encoding": "jpeg",
        "image_size": list(size), "batch_size": args.batch,
        "workers": args.workers, "generation_seconds": generation_s,
        "loader_images_per_s": {"shards": shard_rate, "jpeg_files": file_rate,
                                "shards_over_files": shard_rate / file_rate, "rounds": rates},
        "training": {"preset": args.train_preset, "steps_measured": len(steps), "seconds_per_step": total / len(steps),
                     "data_wait_share": share, "target_data_wait_share": 0.05},
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
