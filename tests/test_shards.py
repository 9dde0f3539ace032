"""Plans, the LMDB shard format and the in-process job path (`reidgen generate`, `reidgen shards`),
on a real DG-Net checkpoint and real market1501_mini images."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from api_schemas.jobs import JobSpec, RecordMeta
from reidgen.cli import main
from reidgen.core.errors import ReidgenError
from worker import shards as shard_mod
from worker.plans import make_plan
from worker.run import generate_shard, load_runtime, run_job
from worker.shards import ShardReader, ShardWriter, shard_paths, verify

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def spec_for(tiny, **kw) -> JobSpec:
    base = dict(kind="dgnet_random_structures", checkpoint=str(tiny["dgnet"]), data=str(tiny["data"]), subset=10,
                structures_per_image=2, shard_size=8, batch_size=4, seed=3)
    return JobSpec(**{**base, **kw})


def all_records(out: Path) -> dict[int, bytes]:
    found = {}
    for path in shard_paths(out):
        reader = ShardReader(path)
        for i, entry in enumerate(reader.manifest.records):
            assert entry.index not in found
            found[entry.index] = reader.raw(i)
    return found


# -- plans -----------------------------------------------------------------------------------------
def test_plans_are_deterministic_and_follow_the_spec(tiny_dgnet):
    s = spec_for(tiny_dgnet)
    plan = make_plan(s)
    again = make_plan(JobSpec.model_validate_json(s.model_dump_json()))
    assert plan.hash == again.hash and np.array_equal(plan.pairs, again.pairs)
    assert plan.records == 20 and plan.shards == 3 and list(plan.shard_range(2)) == [16, 17, 18, 19]
    pids = [it.pid for it in plan.sources]
    assert all(pids[a] != pids[b] for a, b in plan.pairs)  # cross-identity by default
    assert make_plan(spec_for(tiny_dgnet, seed=4)).hash != plan.hash

    everything = make_plan(spec_for(tiny_dgnet, kind="dgnet_all_pairs", cross_identity=False))
    assert everything.records == 100  # N×N, own reconstructions included
    cross = make_plan(spec_for(tiny_dgnet, kind="dgnet_all_pairs"))
    same = sum(pids[a] == pids[b] for a in range(10) for b in range(10))
    assert cross.records == 100 - same

    with pytest.raises(ValueError, match="target"):
        spec_for(tiny_dgnet, kind="crgan_render")
    with pytest.raises(ValueError, match="extra"):
        JobSpec.model_validate({**s.model_dump(), "shardsize": 3})


# -- the shard format -------------------------------------------------------------------------------
def test_writer_grows_the_map_and_the_reader_checks_records(tmp_path, monkeypatch):
    monkeypatch.setattr(shard_mod, "_INITIAL_MAP", 64 * 1024)  # tiny map: forces several doublings
    writer = ShardWriter(tmp_path, 0)
    blobs = [(i, shard_mod.pack_record({"index": i}, os.urandom(30_000))) for i in range(12)]
    for k in range(0, 12, 4):
        writer.add(blobs[k:k + 4])
    writer.fail(12, "cannot read image x.jpg")
    spec = JobSpec(kind="dgnet_all_pairs", checkpoint="c", data="d")
    assert writer.commit(shards=1, plan_hash="h", spec=spec, models={}, label_map=[])
    reader = ShardReader(tmp_path / "shard-00000")
    assert len(reader) == 12 and reader.manifest.failed[0].index == 12
    assert [reader.raw(i) for i in range(12)] == [b for _, b in blobs]
    assert not list(tmp_path.glob(".shard-*"))


def test_same_spec_twice_gives_identical_records_and_a_finished_shard_is_never_rewritten(tiny_dgnet, tmp_path):
    s = spec_for(tiny_dgnet)
    first = run_job(s, tmp_path / "a", device="cpu", progress=False)
    second = run_job(s, tmp_path / "b", device="cpu", progress=False)
    assert [r.status for r in first] == ["done"] * 3 and sum(r.records for r in second) == 20
    a, b = all_records(tmp_path / "a"), all_records(tmp_path / "b")
    assert sorted(a) == list(range(20)) and a == b
    # The pipeline with I/O threads beside the device (the default off the CPU) writes the same bytes.
    runtime = load_runtime(s, "cpu")
    for index in range(3):
        generate_shard(s, index, tmp_path / "threads", runtime, overlap=True)
    assert all_records(tmp_path / "threads") == a

    meta, image = ShardReader(tmp_path / "a" / "shard-00000").record(0)
    meta = RecordMeta.model_validate(meta)
    plan = make_plan(s)
    ai, si = plan.pairs[0]
    assert meta.appearance.pid == plan.sources[ai].pid and meta.structure.pid == plan.structures[si].pid
    assert meta.structure_label == meta.structure.label >= 0  # L_fine: the structure provider's identity
    assert len(meta.soft_label.classes) == 4  # top_k 10 of 4 classes → 4, renormalised
    assert abs(sum(meta.soft_label.probs) - 1) < 1e-5
    assert Image.open(io.BytesIO(image)).size == (64, 128)

    data_file = tmp_path / "a" / "shard-00001" / "data.mdb"
    before = data_file.stat().st_mtime_ns
    again = run_job(s, tmp_path / "a", device="cpu", progress=False)
    assert [r.status for r in again] == ["skipped"] * 3 and data_file.stat().st_mtime_ns == before


def test_half_written_shard_is_discarded_and_redone(tiny_dgnet, tmp_path):
    s = spec_for(tiny_dgnet)
    reference = tmp_path / "ref"
    run_job(s, reference, device="cpu", progress=False)
    out = tmp_path / "out"
    crashed = ShardWriter(out, 1)  # a writer that never finishes: what a killed worker leaves
    crashed.add([(8, b"garbage")])
    crashed.env.close()
    assert verify(out).in_progress == 1
    run_job(s, out, device="cpu", progress=False)
    report = verify(out)
    assert report.ok and report.in_progress == 0 and not (out / crashed.tmp).exists()
    assert all_records(out) == all_records(reference)


def test_corrupted_record_is_detected_by_verify(tiny_dgnet, tmp_path, capsys):
    run_job(spec_for(tiny_dgnet), tmp_path, device="cpu", progress=False)
    assert main(["shards", "verify", str(tmp_path)]) == 0
    reader = ShardReader(tmp_path / "shard-00002")
    value, index = reader.raw(1), reader.manifest.records[1].index
    reader.close()
    data_file = tmp_path / "shard-00002" / "data.mdb"
    raw = bytearray(data_file.read_bytes())
    at = raw.find(value)
    assert at >= 0
    raw[at + len(value) - 100] ^= 0xFF  # one flipped byte inside the record's image
    data_file.write_bytes(bytes(raw))
    capsys.readouterr()
    assert main(["shards", "verify", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"record {index} does not match its checksum" in out and "FAILED" in out
    with pytest.raises(shard_mod.CorruptRecord):
        ShardReader(tmp_path / "shard-00002").raw(1)


def test_unreadable_image_fails_only_its_records(tiny_dgnet, tmp_path):
    data = tmp_path / "data"
    for split in ("bounding_box_train", "query", "bounding_box_test"):
        (data / split).mkdir(parents=True)
    for f in sorted((tiny_dgnet["data"] / "bounding_box_train").iterdir())[:6]:
        (data / "bounding_box_train" / f.name).symlink_to(f.resolve())
    (data / "bounding_box_train" / "0011_c1s1_999999_01.jpg").write_bytes(b"not a jpeg")
    s = spec_for(tiny_dgnet, data=str(data), subset=None, kind="dgnet_all_pairs", cross_identity=False,
                 shard_size=20)
    results = run_job(s, tmp_path / "out", device="cpu", progress=False)
    plan = make_plan(s)
    bad = [i for i, (a, b) in enumerate(plan.pairs) if "999999" in plan.sources[a].path + plan.sources[b].path]
    assert len(bad) == 13 and sum(r.failed for r in results) == 13  # its row and column of the 7×7 grid
    report = verify(tmp_path / "out")
    assert report.ok and report.records == 49 - 13 and report.failed_records == 13
    failed = [f for p in shard_paths(tmp_path / "out") for f in ShardReader(p).manifest.failed]
    assert sorted(f.index for f in failed) == bad and "cannot read image" in failed[0].error


def test_cli_generate_inspect_and_errors(tiny_dgnet, tmp_path, capsys):
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(spec_for(tiny_dgnet, encoding="jpeg", jpeg_quality=90).model_dump_json())
    out = tmp_path / "out"
    assert main(["generate", str(spec_file), "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    assert "20 records written" in capsys.readouterr().out
    sheet = tmp_path / "sheet.png"
    assert main(["shards", "inspect", str(out), "--sheet", str(sheet), "--count", "12"]) == 0
    text = capsys.readouterr().out
    assert "3 shard(s), 20 records" in text and '"structure_label"' in text
    assert Image.open(sheet).size == (8 * 66 + 2, 2 * 130 + 2)
    assert Image.open(io.BytesIO(ShardReader(out / "shard-00000").record(0)[1])).format == "JPEG"

    # another spec into the same folder is refused; a malformed spec is one error line
    other = tmp_path / "other.json"
    other.write_text(spec_for(tiny_dgnet, seed=99).model_dump_json())
    assert main(["generate", str(other), "--out", str(out), "--no-progress"]) == 2
    assert "holds the shards of another job" in capsys.readouterr().err
    other.write_text(json.dumps({"kind": "dgnet_all_pairs", "checkpoint": "x", "data": "y", "shard_size": 0}))
    assert main(["generate", str(other), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("reidgen: error: job spec") and "shard_size" in err
    with pytest.raises(ReidgenError, match="not found"):
        run_job(spec_for(tiny_dgnet, checkpoint=str(tmp_path / "missing.pt")), tmp_path / "o3", progress=False)


def test_crgan_render_job(tiny_dgnet, cuhk_mini, tmp_path):
    """CR-GAN renders (source × target instances) through the same engine and shard format."""
    from dataclasses import replace

    from generator_service.models.crgan_nets import CRGAN_PRESETS
    from reidgen.core.market import link_subset
    from trainer.tasks.crgan import crgan_preset_config, train_crgan

    target = link_subset(cuhk_mini, tmp_path / "target", ids=2)
    model = replace(CRGAN_PRESETS["small"], base_channels=12, dis_channels=16, cam_channels=(8, 16, 32, 32))
    crgan = train_crgan(crgan_preset_config("small", source=str(tiny_dgnet["data"]), target=str(target),
                                            id_model=str(tiny_dgnet["teacher"]), model=model, masks="geometric",
                                            batch_size=4, cam_epochs=1, workers=0, grid_every=0, amp=False,
                                            iterations=1, checkpoint_every=10_000), tmp_path / "crgan",
                        progress=False)
    spec = JobSpec(kind="crgan_render", checkpoint=str(crgan), data=str(tiny_dgnet["data"]), subset=3,
                   target=str(target), targets_per_source=None, shard_size=4, batch_size=4, top_k=2)
    plan = make_plan(spec)
    n_targets = len(plan.structures)
    assert plan.records == 3 * n_targets  # every source × every target
    run_job(spec, tmp_path / "out", device="cpu", progress=False)
    assert verify(tmp_path / "out").ok
    meta = RecordMeta.model_validate(ShardReader(shard_paths(tmp_path / "out")[0]).record(1)[0])
    assert meta.structure.domain == "target" and meta.structure.label == -1  # a context, not a known person
    assert meta.structure_label == meta.appearance.label >= 0  # a rendering keeps the source's identity
    assert len(meta.soft_label.classes) == 2
    with pytest.raises(ReidgenError, match="needs a dgnet checkpoint"):
        run_job(spec_for(tiny_dgnet, checkpoint=str(crgan)), tmp_path / "o2", progress=False)
