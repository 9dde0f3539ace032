"""Crafted shard records are input (issue 23, item 5): a record whose image is a decompression bomb
or far larger than its labels say, or whose soft label has the wrong shape, passes its checksum
(the crafter recomputed it) but is dropped, counted, by the shard reader training uses, and
`reidgen shards verify` reports it. Before the fix: an uncaught ``DecompressionBombError`` (20000²),
a ``RuntimeError`` (soft label of the wrong length) and a 10000² image decoded whole (1.7 GB)."""
from __future__ import annotations

import io
import struct
import zlib

import pytest
import torch
from PIL import Image

from api_schemas.jobs import JobSpec, RecordMeta, SoftLabel, SourceRef
from reidgen.cli import main
from reidgen.core.images import eval_transform
from reidgen.core.market import LabelMap
from worker.shards import CorruptRecord, ShardWriter, pack_record, verify

LABELS = LabelMap((2, 7, 9, 11))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width``×``height`` pixels, with one row of data: a few bytes
    that a reader which trusts the header would try to decode into gigabytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (3 * width + 1)))
            + chunk(b"IEND", b""))


def real_png(height: int = 128, width: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 30)).save(buf, format="PNG")
    return buf.getvalue()


def meta(index: int, soft: SoftLabel | None = None, **over) -> dict:
    source = SourceRef(path="a.jpg", pid=7, camera=1, domain="d", label=1)
    record = RecordMeta(index=index, kind="dgnet_random_structures", appearance=source, structure=source,
                        soft_label=soft or SoftLabel(classes=[1, 2], probs=[0.75, 0.25]), structure_label=1,
                        encoding="png", height=128, width=64)
    return {**record.model_dump(mode="json"), **over}


@pytest.fixture
def crafted(tmp_path):
    """A shard of 6 records: 2 good, 4 crafted, every checksum right."""
    records = [
        (0, pack_record(meta(0), real_png())),
        (1, pack_record(meta(1), png_header_only(20000, 20000))),     # a decompression bomb
        (2, pack_record(meta(2), png_header_only(10000, 10000))),     # 100 M pixels: decodes, 1.7 GB
        (3, pack_record(meta(3, soft_label={"classes": [0, 1, 2], "probs": [0.5, 0.5]}), real_png())),
        (4, pack_record(meta(4, soft_label={"classes": [0, 99], "probs": [0.5, 0.5]}), real_png())),
        (5, pack_record(meta(5), real_png())),
    ]
    writer = ShardWriter(tmp_path / "job", 0)
    writer.add(records)
    spec = JobSpec(kind="dgnet_random_structures", checkpoint="x", data="y", shard_size=8)
    assert writer.commit(shards=1, plan_hash="0" * 16, spec=spec, models={}, label_map=list(LABELS.pids))
    return tmp_path / "job"


def test_the_shard_reader_drops_crafted_records_and_training_counts_them(crafted):
    from trainer.feeds.shards import ShardDataset

    ds = ShardDataset([crafted], eval_transform((128, 64)), LABELS, (128, 64))
    ok = [bool(ds[i][4]) for i in range(len(ds))]
    assert ok == [True, False, False, False, False, True]
    image, soft, fine, appearance, _, _ = ds[0]
    assert image.shape == (3, 128, 64) and soft.tolist() == [0, 0.75, 0.25, 0] and (fine, appearance) == (1, 1)
    strict = ShardDataset([crafted], eval_transform((128, 64)), LABELS, (128, 64), strict=True)
    for i, words in ((1, "pixels"), (2, "at most"), (3, "as many classes as probabilities"), (4, "outside 0..3")):
        with pytest.raises(CorruptRecord, match=words):
            strict[i]


def test_the_synthetic_feed_drops_them_with_a_count(crafted):
    """What train-reid --shards does with a batch: the bad samples leave it, named in ``feed.bad``
    (the trainer logs them as a ``corrupt_synthetic`` event with their count)."""
    from trainer.feeds.shards import ShardDataset
    from trainer.feeds.synthetic import ShardFeed

    ds = ShardDataset([crafted], eval_transform((128, 64)), LABELS, (128, 64))
    batch = [ds[i] for i in range(len(ds))]
    columns = [torch.stack([b[k] for b in batch]) if k < 2 else torch.tensor([b[k] for b in batch]) for k in range(6)]
    feed = ShardFeed.__new__(ShardFeed)
    feed.dataset, feed.bad, feed.device, feed.stream = ds, [], torch.device("cpu"), iter([(tuple(columns),)])
    images, soft, fine = feed(None, None)
    assert len(images) == len(soft) == len(fine) == 2 and len(feed.bad) == 4


def test_shards_verify_reports_the_crafted_records(crafted, capsys):
    report = verify(crafted)
    assert not report.ok and len(report.corrupt) == 4, report.corrupt
    assert main(["shards", "verify", str(crafted)]) != 0
    out = capsys.readouterr().out
    assert out.count("corrupt:") == 4 and "FAILED" in out
