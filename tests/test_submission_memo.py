"""Repeated submissions on one model and one data set: what a submission read is remembered per
version of the file or folder (`worker.stamps`), and never answers for a version it was not read from.

No Redis, no worker: `check_models` and `make_plan` are called as `submit_job` calls them, after
`locate` has confined the names to a server's roots. Checkpoints are headers only, data sets
empty files with Market-style names (a listing reads names, not images). What is parsed or listed
is counted by wrapping `checkpoint_kind` and `scan_split` where the memo calls them.

Timestamps are coarse, so the tests never rely on a change giving another mtime by itself: a
checkpoint is replaced by a rename (another inode), a folder's mtime is set explicitly.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import worker.plans as plans
import worker.stamps as stamps
import worker.submission as submission
from api_schemas.jobs import JobSpec
from generator_service.http import Settings
from reidgen.core.checkpoint import save_checkpoint
from reidgen.core.errors import ReidgenError
from worker.plans import list_split, locate, make_plan
from worker.submission import check_models


@pytest.fixture
def settled_now(monkeypatch):
    """Every file counts as settled at once (the tests set stamps themselves); empty memos."""
    monkeypatch.setattr(stamps, "SETTLED_NS", -1)
    for memo in (submission._kind_of_stamped, plans._listing_of_stamped, plans._cached_plan):
        memo.cache_clear()
    yield
    for memo in (submission._kind_of_stamped, plans._listing_of_stamped, plans._cached_plan):
        memo.cache_clear()


@pytest.fixture
def parses(monkeypatch) -> list[str]:
    """The paths whose checkpoint header was parsed, in order."""
    seen: list[str] = []
    real = submission.checkpoint_kind

    def counted(path):
        seen.append(str(path))
        return real(path)

    monkeypatch.setattr(submission, "checkpoint_kind", counted)
    return seen


@pytest.fixture
def scans(monkeypatch) -> list[str]:
    """The data folders listed, in order."""
    seen: list[str] = []
    real = plans.scan_split

    def counted(root, split, **kwargs):
        seen.append(str(root))
        return real(root, split, **kwargs)

    monkeypatch.setattr(plans, "scan_split", counted)
    return seen


def image(folder: Path, pid: int, n: int = 0) -> None:
    (folder / f"{pid:04d}_c1s1_{n:06d}_00.jpg").write_bytes(b"")


def set_mtime(path: Path, seconds: int) -> None:
    os.utime(path, ns=(seconds * 10**9, seconds * 10**9))


@pytest.fixture
def server(tmp_path) -> Settings:
    """Roots holding a DG-Net run folder, a re-id teacher and a data set of three identities."""
    models, data, shards = tmp_path / "models", tmp_path / "data", tmp_path / "shards"
    save_checkpoint(models / "dgnet" / "checkpoints" / "last.pt", "dgnet", {})
    save_checkpoint(models / "reid.pt", "reid", {})
    train = data / "market" / "bounding_box_train"
    train.mkdir(parents=True)
    for pid in (1, 2, 3):
        image(train, pid)
    shards.mkdir()
    return Settings(models_root=models, data_root=data, shards_root=shards)


def spec(**fields) -> JobSpec:
    base = {"kind": "dgnet_random_structures", "checkpoint": "dgnet", "teacher": "reid", "data": "market",
            "structures_per_image": 1, "shard_size": 1}
    return JobSpec.model_validate({**base, **fields})


def check(job: JobSpec, settings: Settings) -> None:
    check_models(job, locate(job, "out", settings), settings.models_root)


def refusal_code(job: JobSpec, settings: Settings) -> str:
    with pytest.raises(ReidgenError) as info:
        check(job, settings)
    return info.value.code


# -- checkpoints ----------------------------------------------------------------------------------
def test_a_second_submission_does_not_parse_the_checkpoints_again(settled_now, parses, server):
    check(spec(), server)
    assert len(parses) == 2  # the DG-Net and its teacher
    check(spec(seed=1), server)
    check(spec(seed=2, teacher=None, soft_labels=False), server)
    assert len(parses) == 2


def test_a_replaced_checkpoint_is_parsed_again(settled_now, parses, server):
    """Replaced by a rename (as `save_checkpoint` writes), or rewritten in place: the next
    submission sees the new file's kind. Each change gets an mtime of its own, as changes more
    than a timestamp tick apart do (a freed inode may be reused, the size may be the same)."""
    last = (server.models_root / "dgnet" / "checkpoints" / "last.pt").resolve()
    set_mtime(last, 1_000_000)
    check(spec(), server)
    save_checkpoint(last, "crgan", {})
    set_mtime(last, 1_000_001)
    assert refusal_code(spec(seed=1), server) == "bad_checkpoint"
    save_checkpoint(last, "dgnet", {})
    set_mtime(last, 1_000_002)
    check(spec(seed=2), server)
    last.write_bytes(b"no longer a checkpoint")  # the same inode
    set_mtime(last, 1_000_003)
    assert refusal_code(spec(seed=3), server) == "bad_checkpoint"
    assert parses.count(str(last)) == 4


def test_a_checkpoint_replaced_while_it_is_parsed_is_not_remembered(settled_now, parses, server, monkeypatch):
    """The answer read may be the new file's: it must not stay remembered under the old file's stamp."""
    last = (server.models_root / "dgnet" / "checkpoints" / "last.pt").resolve()
    real = submission.checkpoint_kind

    def replaced_meanwhile(path):
        kind = real(path)
        if path == str(last) and parses.count(str(last)) == 1:
            save_checkpoint(last, "crgan", {})
        return kind

    monkeypatch.setattr(submission, "checkpoint_kind", replaced_meanwhile)
    check(spec(), server)  # read before the rename: a DG-Net
    assert refusal_code(spec(seed=1), server) == "bad_checkpoint"
    assert parses.count(str(last)) == 2


def test_a_checkpoint_changed_just_now_is_parsed_each_time(parses, server, monkeypatch):
    """Within a timestamp tick a change may leave the stamp as it was: such a file is not remembered."""
    monkeypatch.setattr(stamps, "SETTLED_NS", 10**18)
    check(spec(), server)
    check(spec(seed=1), server)
    assert len(parses) == 4


def test_the_memo_sits_behind_the_confinement(settled_now, parses, server, tmp_path):
    """A checkpoint remembered for one models root is still refused when reached from outside it."""
    check(spec(), server)
    other = tmp_path / "other_models"
    (other / "dgnet" / "checkpoints").mkdir(parents=True)
    (other / "dgnet" / "checkpoints" / "last.pt").symlink_to(server.models_root / "dgnet" / "checkpoints" / "last.pt")
    save_checkpoint(other / "reid.pt", "reid", {})
    elsewhere = Settings(models_root=other, data_root=server.data_root, shards_root=server.shards_root)
    assert refusal_code(spec(seed=1), elsewhere) == "bad_checkpoint"


# -- data sets ------------------------------------------------------------------------------------
def test_a_data_set_is_listed_once_per_version_of_its_folder(settled_now, scans, server):
    """Jobs that differ in their seed list the folder once; an image of a new identity added (the
    folder's mtime moves on) is in the next job's plan."""
    train = server.data_root / "market" / "bounding_box_train"
    set_mtime(train, 1_000_000)
    data = locate(spec(), "out", server).data
    assert len(make_plan(spec(), data).sources) == 3
    assert len(make_plan(spec(seed=1), data).sources) == 3
    assert len(scans) == 1
    image(train, 4)
    set_mtime(train, 1_000_001)
    plan = make_plan(spec(seed=2), data)
    assert len(scans) == 2 and {it.pid for it in plan.sources} == {1, 2, 3, 4}


def test_a_folder_changed_just_now_is_listed_each_time(scans, server, monkeypatch):
    monkeypatch.setattr(stamps, "SETTLED_NS", 10**18)
    data = locate(spec(), "out", server).data
    list_split(data, "train")
    list_split(data, "train")
    assert len(scans) == 2


def test_a_missing_split_is_refused_each_time(settled_now, server):
    data = locate(spec(), "out", server).data
    with pytest.raises(ReidgenError, match="has no query/"):
        list_split(data, "query")
    (data / "query").mkdir()
    image(data / "query", 5)
    assert [it.pid for it in list_split(data, "query")] == [5]
