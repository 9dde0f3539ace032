"""The re-id trainer on real plus synthetic images: the shard data set (lazy LMDB per DataLoader
worker, checksums) and `reidgen train-reid --real DIR --shards DIR` / `--online-generator`,
with real shards generated from a real DG-Net checkpoint on market1501_mini."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader

from reidgen.cli import main
from reidgen.core.checkpoint import load_checkpoint
from reidgen.core.errors import ReidgenError
from reidgen.core.images import eval_transform
from reidgen.core.market import LabelMap, link_subset, scan_split
from trainer.feeds.shards import ShardDataset
from worker.shards import CorruptRecord, ShardReader

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shards(make_shards, tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("train-shards"), subset=12, shard_size=10, seed=5)


def label_map_of(data) -> LabelMap:
    return LabelMap.from_items(scan_split(data, "train"))


def test_shard_dataset_reads_every_record_in_loader_workers(tiny_dgnet, shards):
    ds = ShardDataset([shards], eval_transform((128, 64)), label_map_of(tiny_dgnet["data"]), (128, 64))
    assert len(ds) == 24 and len(ds.readers) == 3
    ds[0]  # opens LMDB in this process; the workers must open their own
    loader = DataLoader(ds, batch_size=5, num_workers=2)
    seen, fine = [], []
    for images, soft, structure, appearance, ok, index in loader:
        assert images.shape[1:] == (3, 128, 64) and bool(ok.all())
        assert torch.allclose(soft.sum(1), torch.ones(len(soft)), atol=1e-5) and int((soft > 0).sum(1).max()) <= 3
        assert bool((structure != appearance).all())  # cross-identity swaps
        seen += index.tolist()
        fine += structure.tolist()
    assert sorted(seen) == list(range(24)) and min(fine) >= 0


def test_corrupted_record_is_detected_by_the_data_set(tiny_dgnet, shards, tmp_path):
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    shard = copy / "shard-00001"
    value = ShardReader(shard).raw(3)
    raw = bytearray((shard / "data.mdb").read_bytes())
    at = raw.find(value)
    raw[at + len(value) - 50] ^= 0x55
    (shard / "data.mdb").write_bytes(bytes(raw))
    lm = label_map_of(tiny_dgnet["data"])
    ds = ShardDataset([copy], eval_transform((128, 64)), lm, (128, 64))
    bad = 10 + 3
    assert ds[bad][4] is False and ds[bad][2] == -1  # dropped and reported by the trainer
    assert all(ds[i][4] for i in range(24) if i != bad)
    strict = ShardDataset([copy], eval_transform((128, 64)), lm, (128, 64), strict=True)
    with pytest.raises(CorruptRecord, match="does not match its checksum"):
        strict[bad]


def test_shards_of_other_identities_are_refused(market_mini, shards, tmp_path):
    other = link_subset(market_mini, tmp_path / "other", ids=3)
    with pytest.raises(ReidgenError, match="class lists differ"):
        ShardDataset([shards], eval_transform((128, 64)), label_map_of(other), (128, 64))
    run = tmp_path / "run"
    assert main(["train-reid", "--real", str(other), "--shards", str(shards), "--preset", "tiny", "--out", str(run),
                 "--max-steps", "1", "--workers", "0", "--no-eval", "--device", "cpu"]) == 2


def _steps(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_train_reid_on_real_plus_shards_and_exact_resume(tiny_dgnet, shards, tmp_path):
    run = tmp_path / "run"
    assert main(["train-reid", "--real", str(tiny_dgnet["data"]), "--shards", str(shards), "--preset", "tiny",
                 "--out", str(run), "--max-steps", "4", "--batch-size", "8", "--synthetic-ratio", "0.5",
                 "--checkpoint-every", "2", "--keep-checkpoints", "--workers", "1", "--no-eval",
                 "--device", "cpu"]) == 0
    steps = _steps(run)
    assert len(steps) == 4
    for s in steps:
        assert s["synthetic"] == 4 and s["loss_prim"] > 0 and s["loss_fine"] > 0
        assert 0 <= s["data_wait_s"] <= s["step_s"]
        assert s["loss"] == pytest.approx(s["loss_id"] + 2.0 * s["loss_prim"] + 0.4 * s["loss_fine"], rel=1e-4)
    ckpt = load_checkpoint(run, "reid")
    assert "fine_head" in ckpt["models"] and ckpt["train_config"]["shards"] == [str(shards.resolve())]

    # Resumed at step 2, the same real and synthetic samples come back: the same losses follow.
    resumed = tmp_path / "resumed"
    assert main(["train-reid", "--resume", str(run / "checkpoints" / "step_0000002.pt"), "--out", str(resumed)]) == 0
    again = _steps(resumed)
    assert [s["step"] for s in again] == [3, 4]
    for s, ref in zip(again, steps[2:]):
        for key in ("loss", "loss_id", "loss_prim", "loss_fine"):
            assert s[key] == pytest.approx(ref[key], rel=1e-5), (s["step"], key)


def test_train_reid_with_online_generator(tiny_dgnet, tmp_path):
    run = tmp_path / "run"
    assert main(["train-reid", "--real", str(tiny_dgnet["data"]), "--online-generator", str(tiny_dgnet["dgnet"]),
                 "--preset", "tiny", "--out", str(run), "--max-steps", "2", "--batch-size", "8", "--workers", "0",
                 "--no-eval", "--device", "cpu"]) == 0
    steps = _steps(run)
    assert len(steps) == 2 and all(s["synthetic"] == 8 and s["loss_prim"] > 0 and s["loss_fine"] > 0 for s in steps)
