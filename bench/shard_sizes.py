"""What a shard weighs on storage (issue 26: the object-storage design note, docs/scaling/shards.md).

Two measurements, printed as JSON (and written to --out when given):

1. A real shard job, through the same code path as a worker (`worker.run.run_job`), on a few
   identities of a data set, with a DG-Net made on the spot (a few iterations of the small
   preset: its images are not worth looking at, but the records have the real layout: labels,
   soft labels, encoded image, LMDB pages, manifest). Per encoding: records, bytes per record
   (labels and image separately), data.mdb and manifest.json per shard.
2. The image part of a record for a trained generator, estimated from the data set's own photos
   re-encoded as a record would hold them (128×64 for the small and fast presets, 256×128 for the
   paper preset; JPEG at the job's quality, PNG): a generator of a few iterations does not make
   images that compress like people.

    python bench/shard_sizes.py [--data market1501_mini] [--ids 8] [--subset 128] [--k 4] [--shard-size 256]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_models(data: str, root: Path) -> str:
    from trainer.tasks.dgnet import dgnet_preset_config, train_dgnet
    from trainer.tasks.reid import preset_config, train_reid

    teacher = train_reid(preset_config("tiny", data=data, epochs=1, workers=0, evaluate=False), root / "teacher",
                         progress=False)
    return str(train_dgnet(dgnet_preset_config("small", data=data, teacher=str(teacher), backbone="small_cnn",
                                               pretrained="none", iterations=4, workers=0, batch_size=4,
                                               grid_every=0, quality_every=0, amp=False, checkpoint_every=10**9),
                           root / "dgnet", progress=False))


def measure_job(checkpoint: str, data: str, out: Path, encoding: str, args) -> dict:
    from api_schemas.jobs import JobSpec
    from worker.run import run_job
    from worker.shards import ShardReader, shard_paths

    spec = JobSpec(kind="dgnet_random_structures", checkpoint=checkpoint, data=data, subset=args.subset,
                   structures_per_image=args.k, shard_size=args.shard_size, batch_size=16, seed=0,
                   encoding=encoding, jpeg_quality=args.jpeg_quality)
    started = time.perf_counter()
    run_job(spec, out, device="cpu", progress=False)
    seconds = time.perf_counter() - started
    shards, labels, images = [], [], []
    for path in shard_paths(out):
        reader = ShardReader(path)
        for i in range(len(reader)):
            value = reader.raw(i)
            (n,) = struct.unpack("<I", value[4:8])
            labels.append(8 + n)
            images.append(len(value) - 8 - n)
        reader.close()
        shards.append({"records": len(reader), "data_mdb_bytes": (path / "data.mdb").stat().st_size,
                       "manifest_bytes": (path / "manifest.json").stat().st_size})
    full = [s for s in shards if s["records"] == args.shard_size] or shards
    records = sum(s["records"] for s in shards)
    return {
        "encoding": encoding, "records": records, "shards": len(shards), "seconds": round(seconds, 1),
        "record_bytes_mean": round(statistics.mean(a + b for a, b in zip(labels, images))),
        "label_bytes_mean": round(statistics.mean(labels)), "image_bytes_mean": round(statistics.mean(images)),
        "data_mdb_bytes_per_record": round(sum(s["data_mdb_bytes"] for s in full) / sum(s["records"] for s in full)),
        "manifest_bytes_per_record": round(sum(s["manifest_bytes"] for s in full) / sum(s["records"] for s in full)),
        "job_json_bytes": (out / "job.json").stat().st_size,
        "per_shard": shards,
    }


def photo_sizes(data: Path, count: int, quality: int) -> dict:
    """Mean encoded bytes of the data set's first ``count`` training photos at each record size."""
    from PIL import Image

    from reidgen.core.images import encode_image

    files = sorted((data / "bounding_box_train").glob("*.jpg"))[:count]
    sizes: dict[str, list[int]] = {}
    for f in files:
        photo = Image.open(f).convert("RGB")
        for h, w in ((128, 64), (256, 128)):
            picture = photo.resize((w, h), Image.BILINEAR)
            for encoding in ("jpeg", "png"):
                sizes.setdefault(f"{h}x{w}_{encoding}", []).append(len(encode_image(picture, encoding, quality)))
    return {"photos": len(files), **{k: round(statistics.mean(v)) for k, v in sizes.items()}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="market1501_mini")
    p.add_argument("--ids", type=int, default=8, help="identities of the data set to use")
    p.add_argument("--subset", type=int, default=128, help="source images of the job")
    p.add_argument("--k", type=int, default=4, help="structures per image")
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.add_argument("--photos", type=int, default=200, help="photos re-encoded for the image-size estimate")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()

    import torch

    from reidgen.core.market import link_subset
    from reidgen.core.paths import resolve_data

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    source = Path(resolve_data(args.data))
    with tempfile.TemporaryDirectory(prefix="reidgen-shard-sizes-") as tmp:
        root = Path(tmp)
        data = str(link_subset(source, root / "data", ids=args.ids))
        checkpoint = make_models(data, root)
        jobs = [measure_job(checkpoint, data, root / f"shards-{e}", e, args) for e in ("jpeg", "png")]
    result = {"command": "python bench/shard_sizes.py " + " ".join(sys.argv[1:]), "data": args.data,
              "ids": args.ids, "subset": args.subset, "structures_per_image": args.k,
              "shard_size": args.shard_size, "jpeg_quality": args.jpeg_quality, "image_size": [128, 64],
              "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "jobs": jobs,
              "photos": photo_sizes(source, args.photos, args.jpeg_quality)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
