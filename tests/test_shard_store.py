"""The shard store on a file system shared by several hosts (NFS, CephFS, Lustre; issue 26, item 2):
what the LMDB writer and readers must do there, checked on the local disk by watching the calls.

- readers open a finished shard read-only, without a lock file and without readahead, and leave
  its files as they were;
- a shard being written lives under a hidden temporary name that no reader lists or opens;
- the rename to the final name comes after the records, the manifest and the folder's names
  were flushed (fsync), and the output folder is flushed after it;
- a crashed writer leaves only its temporary name, which the next writer of the shard removes;
  a duplicate that loses the race ends with False, not an error;
- the manifest names the host whose worker wrote the shard, and `verify`/`inspect` show it.

No model is needed: the records are made up (the format does not care what the image bytes are).
"""
from __future__ import annotations

import io
import json
import os
import socket

import lmdb
import numpy as np
import pytest
from PIL import Image

from api_schemas.jobs import JobSpec, ShardManifest
from reidgen.cli import main
from reidgen.core.confined import Folder
from reidgen.core.errors import ReidgenError
from worker import shards as shard_mod
from worker.shards import ShardReader, ShardWriter, shard_done, shard_paths, verify

SPEC = JobSpec(kind="dgnet_all_pairs", checkpoint="c", data="d")


def records(first: int, n: int, size: int = 4000) -> list[tuple[int, bytes]]:
    return [(i, shard_mod.pack_record({"index": i}, os.urandom(size))) for i in range(first, first + n)]


def image_records(first: int, n: int) -> list[tuple[int, bytes]]:
    """Records whose images decode (for `reidgen shards inspect`'s contact sheet)."""
    out = []
    for i in range(first, first + n):
        buf = io.BytesIO()
        Image.fromarray(np.full((16, 8, 3), 40 * i % 256, np.uint8)).save(buf, "PNG")
        out.append((i, shard_mod.pack_record({"index": i}, buf.getvalue())))
    return out


def write_shard(out, index: int, values: list[tuple[int, bytes]], **fields) -> bool:
    writer = ShardWriter(out, index)
    writer.add(values)
    return writer.commit(shards=2, plan_hash="h", spec=SPEC, models={}, label_map=[], **fields)


def test_readers_open_read_only_without_locks(tmp_path, monkeypatch):
    values = records(0, 6)
    assert write_shard(tmp_path, 0, values)
    shard = tmp_path / "shard-00000"
    assert sorted(p.name for p in shard.iterdir()) == ["data.mdb", "manifest.json"]  # the writer made no lock.mdb
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shard.iterdir()}

    opened = []
    real_open = lmdb.open

    def spy(path, **kwargs):
        opened.append(kwargs)
        return real_open(path, **kwargs)

    monkeypatch.setattr(shard_mod.lmdb, "open", spy)
    reader = ShardReader(shard)
    assert [reader.raw(i) for i in range(len(reader))] == [v for _, v in values]
    reader.close()
    assert verify(tmp_path).records == 6  # verify reads through the same environment
    assert opened and all(kw.get("readonly") is True and kw.get("lock") is False and kw.get("readahead") is False
                          for kw in opened), opened
    # Nothing was made or touched: no lock file, the same bytes, the same modification times.
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shard.iterdir()} == before


def test_a_shard_being_written_is_invisible_under_its_final_name(tmp_path):
    writer = ShardWriter(tmp_path, 0)
    writer.add(records(0, 4))
    assert writer.tmp.startswith(".shard-00000.tmp-") and (tmp_path / writer.tmp / "data.mdb").is_file()
    assert not (tmp_path / "shard-00000").exists()
    assert shard_paths(tmp_path) == [] and not shard_done(tmp_path, 0)
    with pytest.raises(ReidgenError, match="not a finished shard"):
        ShardReader(tmp_path / "shard-00000")
    report = verify(tmp_path)
    assert report.shards_found == 0 and report.records == 0 and report.in_progress == 1
    assert writer.commit(shards=1, plan_hash="h", spec=SPEC, models={}, label_map=[])
    assert shard_paths(tmp_path) == [tmp_path / "shard-00000"] and verify(tmp_path).in_progress == 0


class _EnvSpy:
    """An LMDB environment that logs its sync and close calls (the C type takes no attributes)."""

    def __init__(self, env, events: list):
        self._env, self._events = env, events

    def sync(self, force=False):
        self._events.append(("lmdb-sync", force))
        return self._env.sync(force)

    def close(self):
        self._events.append(("lmdb-close",))
        return self._env.close()

    def __getattr__(self, name):
        return getattr(self._env, name)


def test_the_rename_comes_after_the_data_is_complete_and_flushed(tmp_path, monkeypatch):
    events: list = []
    real_open, real_fsync, real_rename = lmdb.open, os.fsync, Folder.rename
    monkeypatch.setattr(shard_mod.lmdb, "open", lambda path, **kw: _EnvSpy(real_open(path, **kw), events))

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        return real_fsync(fd)

    def rename(folder, old, new):
        # At the moment of the rename the temporary folder already holds the whole shard.
        tmp = tmp_path / old
        manifest = ShardManifest.model_validate_json((tmp / "manifest.json").read_text())
        env = real_open(str(tmp), readonly=True, lock=False)
        with env.begin() as txn:
            stored = {int(k): bytes(v) for k, v in txn.cursor()}
        env.close()
        assert manifest.record_count == len(stored) == 10
        assert all(shard_mod.sha256(stored[e.index]) == e.sha256 for e in manifest.records)
        events.append(("rename", old, new))
        return real_rename(folder, old, new)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Folder, "rename", rename)
    writer = ShardWriter(tmp_path, 1)
    for k in range(0, 10, 5):
        writer.add(records(k, 5))
    tmp_ino = (tmp_path / writer.tmp).stat().st_ino
    assert writer.commit(shards=2, plan_hash="h", spec=SPEC, models={}, label_map=[])

    shard = tmp_path / "shard-00001"
    manifest_ino, out_ino = (shard / "manifest.json").stat().st_ino, tmp_path.stat().st_ino
    assert shard.stat().st_ino == tmp_ino  # renamed, not copied
    order = [e[0] if e[0] != "fsync" else {manifest_ino: "fsync-manifest", tmp_ino: "fsync-shard-folder",
                                           out_ino: "fsync-out-folder"}.get(e[1], "fsync-other") for e in events]
    assert order == ["lmdb-sync", "lmdb-close", "fsync-manifest", "fsync-shard-folder", "rename", "fsync-out-folder"]
    assert ("lmdb-sync", True) in events  # a forced flush: the environment was opened with sync=False


def test_a_crashed_writer_leaves_only_a_temporary_name_that_the_next_writer_removes(tmp_path):
    crashed = ShardWriter(tmp_path, 0)  # a writer killed mid-shard: its files stay, never renamed
    crashed.add(records(0, 3))
    crashed.env.close()
    assert shard_paths(tmp_path) == [] and verify(tmp_path).in_progress == 1
    values = records(0, 5)
    assert write_shard(tmp_path, 0, values)
    assert not (tmp_path / crashed.tmp).exists() and verify(tmp_path).in_progress == 0
    reader = ShardReader(tmp_path / "shard-00000")
    assert [reader.raw(i) for i in range(len(reader))] == [v for _, v in values]
    reader.close()


def test_a_duplicate_writer_that_loses_the_race_ends_with_false(tmp_path):
    values = records(0, 4)
    slow = ShardWriter(tmp_path, 0)  # the first copy, still being written when a redelivered task finishes
    slow.add(values[:2])
    assert write_shard(tmp_path, 0, values)  # the duplicate wins and removes the slow one's temporary folder
    slow.add(values[2:])
    assert slow.commit(shards=2, plan_hash="h", spec=SPEC, models={}, label_map=[]) is False
    assert [p.name for p in tmp_path.iterdir()] == ["shard-00000"]
    # Both finished before either renamed: the second rename fails on the finished shard.
    first, second = ShardWriter(tmp_path, 1), ShardWriter(tmp_path, 1)
    for w in (first, second):
        w.add(records(10, 2))
    assert first.commit(shards=2, plan_hash="h", spec=SPEC, models={}, label_map=[]) is True
    assert second.commit(shards=2, plan_hash="h", spec=SPEC, models={}, label_map=[]) is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000", "shard-00001"]


def test_the_manifest_names_the_writing_host(tmp_path, monkeypatch, capsys):
    here = socket.gethostname()
    assert write_shard(tmp_path, 0, image_records(0, 2))
    assert ShardReader(tmp_path / "shard-00000").manifest.host == here
    monkeypatch.setattr(socket, "gethostname", lambda: "gpu-node-2")
    assert write_shard(tmp_path, 1, image_records(2, 2))
    manifest = json.loads((tmp_path / "shard-00001" / "manifest.json").read_text())
    assert manifest["host"] == "gpu-node-2"
    summary = verify(tmp_path).summary()
    hosts = ", ".join(f"{host} (1 shard)" for host in sorted([here, "gpu-node-2"]))
    assert f"written on: {hosts}" in summary, summary
    capsys.readouterr()
    assert main(["shards", "inspect", str(tmp_path), "--sheet", str(tmp_path / "sheet.png")]) == 0
    shown = capsys.readouterr().out
    assert "written on gpu-node-2" in shown and f"written on {here}" in shown, shown


def test_a_manifest_written_before_hosts_were_recorded_still_reads(tmp_path):
    assert write_shard(tmp_path, 0, records(0, 2))
    path = tmp_path / "shard-00000" / "manifest.json"
    old = json.loads(path.read_text())
    del old["host"]
    path.write_text(json.dumps(old))
    assert ShardReader(path.parent).manifest.host is None
    assert "written on: (not recorded) (1 shard)" in verify(tmp_path).summary()
